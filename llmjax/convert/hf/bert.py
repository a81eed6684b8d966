"""BERT: a post-norm encoder with token types, pooler, MLM / NSP / classifier heads."""
from __future__ import annotations

from llmjax.config import ModelConfig
from llmjax.convert.hf.family import Family, register
from llmjax.convert.hf.specs import (GELU_EXPORT, GELU_NAMES, activation_of, fix_norm_shapes,
                                     hf_get, linear_specs, norm_specs, require_plain_mha,
                                     same_spec, unsupported)
from llmjax.errors import ConversionError


@register
class Bert(Family):
    name = "bert"
    llmjax_family = "bert"
    model_types = ("bert",)
    architectures = ("BertForPreTraining", "BertModel", "BertForMaskedLM",
                     "BertForSequenceClassification")
    prefix = "bert."

    def to_config(self, hf, tensors):
        for field, default, ok, why in [
                ("position_embedding_type", "absolute", lambda v: v == "absolute",
                 "only absolute (learned) positions"),
                ("is_decoder", False, lambda v: not v, "BERT is imported as an encoder"),
                ("add_cross_attention", False, lambda v: not v, "no cross-attention")]:
            unsupported(hf, field, ok, default, "bert", why)
        prefix = self.prefix if any(k.startswith(self.prefix) for k in tensors) else ""
        activation = activation_of(hf.get("hidden_act", "gelu"), GELU_NAMES, "hidden_act", "bert")
        mlm = "cls.predictions.transform.dense.weight" in tensors
        if mlm and activation != "gelu_exact":
            raise ConversionError(f"config.json field 'hidden_act'={hf.get('hidden_act')!r} is "
                                  "not supported for bert with an MLM head (llmjax's MLM "
                                  "transform uses exact GELU)")
        classifier = tensors.get("classifier.weight")
        return ModelConfig(
            family="bert", architecture="encoder", vocab_size=hf.get("vocab_size", 30522),
            d_model=hf.get("hidden_size", 768), num_layers=hf.get("num_hidden_layers", 12),
            num_heads=hf.get("num_attention_heads", 12),
            d_ff=hf.get("intermediate_size", 3072),
            max_len=hf.get("max_position_embeddings", 512), norm="layernorm",
            norm_eps=hf.get("layer_norm_eps", 1e-12), norm_position="post", embed_norm=True,
            final_norm=False, activation=activation, position="learned", use_bias=True,
            tie_embeddings=True, num_token_types=hf.get("type_vocab_size", 2),
            pooler=f"{prefix}pooler.dense.weight" in tensors, mlm_head=mlm,
            nsp_head="cls.seq_relationship.weight" in tensors,
            num_labels=0 if classifier is None else int(classifier.shape[0]), scan_layers=False,
            dropout=hf_get(hf, "hidden_dropout_prob", 0.1),
            attention_dropout=hf_get(hf, "attention_probs_dropout_prob", 0.1))

    def specs(self, cfg, prefix):
        d, heads, hd, ff = cfg.d_model, cfg.num_heads, cfg.dim_per_head, cfg.d_ff
        p = prefix
        specs = [same_spec("embed/token/embedding", p + "embeddings.word_embeddings.weight",
                           (cfg.vocab_size, d)),
                 same_spec("embed/position/embedding", p + "embeddings.position_embeddings.weight",
                           (cfg.max_len, d))]
        if cfg.num_token_types:
            specs.append(same_spec("embed/token_type/embedding",
                                   p + "embeddings.token_type_embeddings.weight",
                                   (cfg.num_token_types, d)))
        specs += norm_specs("embed/norm", p + "embeddings.LayerNorm", True)
        for i in range(cfg.num_layers):
            L, h = f"encoder/layers_{i}", f"{p}encoder.layer.{i}"
            for name in ("query", "key", "value"):
                specs += linear_specs(f"{L}/attention/{name}", f"{h}.attention.self.{name}", (d,),
                                      (heads, hd), True)
            specs += linear_specs(f"{L}/attention/out", f"{h}.attention.output.dense", (heads, hd),
                                  (d,), True)
            specs += norm_specs(f"{L}/attention_norm", f"{h}.attention.output.LayerNorm", True)
            specs += linear_specs(f"{L}/mlp/wi", f"{h}.intermediate.dense", (d,), (ff,), True)
            specs += linear_specs(f"{L}/mlp/wo", f"{h}.output.dense", (ff,), (d,), True)
            specs += norm_specs(f"{L}/mlp_norm", f"{h}.output.LayerNorm", True)
        if cfg.pooler:
            specs += linear_specs("heads/pooler", p + "pooler.dense", (d,), (d,), True)
        if cfg.mlm_head:
            specs += linear_specs("heads/mlm_transform", "cls.predictions.transform.dense",
                                  (d,), (d,), True)
            specs += norm_specs("heads/mlm_norm", "cls.predictions.transform.LayerNorm", True)
            specs.append(same_spec("heads/mlm_bias", ("cls.predictions.bias",
                                                  "cls.predictions.decoder.bias"),
                                   (cfg.vocab_size,)))
        if cfg.nsp_head:
            specs += linear_specs("heads/nsp", "cls.seq_relationship", (d,), (2,), True)
        if cfg.num_labels:
            specs += linear_specs("heads/classifier", "classifier", (d,), (cfg.num_labels,), True)
        return fix_norm_shapes(specs, d)

    export_name = "BERT"
    export_requires = {  # fields that must hold to export as BERT
        "architecture": "encoder", "norm": "layernorm", "norm_position": "post",
        "position": "learned", "use_bias": True, "gated_mlp": False, "parallel_block": False,
        "scale_attention": True, "embed_norm": True, "final_norm": False,
        "tie_embeddings": True, "activation": tuple(GELU_EXPORT),
    }

    def check_export(self, cfg):
        super().check_export(cfg)
        require_plain_mha(cfg, "BERT")
        if cfg.num_labels and (cfg.mlm_head or cfg.nsp_head):
            raise ConversionError("model.num_labels with model.mlm_head/nsp_head: no HF BERT "
                                  "class holds both; export one or the other")

    def architecture(self, cfg):
        if cfg.num_labels:
            return "BertForSequenceClassification"
        if cfg.mlm_head and cfg.nsp_head:
            return "BertForPreTraining"
        if cfg.mlm_head:
            return "BertForMaskedLM"
        if cfg.nsp_head:
            raise ConversionError("model.nsp_head without model.mlm_head has no HF BERT class")
        return "BertModel"

    def export_prefix(self, cfg):
        return "" if self.architecture(cfg) == "BertModel" else self.prefix

    def hf_config(self, cfg):
        out = {"architectures": [self.architecture(cfg)], "model_type": "bert",
               "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
               "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
               "intermediate_size": cfg.d_ff, "hidden_act": GELU_EXPORT[cfg.activation],
               "max_position_embeddings": cfg.max_len,
               "type_vocab_size": max(cfg.num_token_types, 1), "layer_norm_eps": cfg.norm_eps,
               "hidden_dropout_prob": cfg.dropout,
               "attention_probs_dropout_prob": cfg.attention_dropout,
               "position_embedding_type": "absolute", "tie_word_embeddings": True}
        if cfg.num_labels:
            out["num_labels"] = cfg.num_labels
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(cfg.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(cfg.num_labels)}
        return out

    def import_prefix(self, tensors):
        """"bert." only when the embeddings carry it: a checkpoint may prefix some heads
        but not the base model."""
        return self.prefix if f"{self.prefix}embeddings.word_embeddings.weight" in tensors else ""

    def ignorable(self, name, cfg):
        return super().ignorable(name, cfg) or name == "cls.predictions.decoder.weight"

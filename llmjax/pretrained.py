"""`llmjax.from_pretrained(path)`: an llmjax export, an HF directory or a GGUF file, as one object.

    model = from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf")
    model.logits(ids)                          # numpy in, numpy out
    model.generate("The capital of France is", max_new_tokens=8)
    model.save("runs/smollm2")                 # an export usable by train.init_from
    clf = from_pretrained("runs/my-classifier")  # a classification run: label names come with it
    clf.classify(["great film", "dull"])       # [Prediction(label, {label: probability}), ...]
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import numpy as np

from llmjax import paths
from llmjax.config import ConfigError, ModelConfig
from llmjax.data.tokenizer import Tokenizer

Params = dict
TOKENIZER_SUBDIR = "tokenizer"
LABELS_FILE = "labels.json"  # label names of a classifier export (id i -> name)


@dataclasses.dataclass
class PretrainedModel:
    """A model config, its parameters (a plain tree, scanned layers) and its tokenizer."""

    config: ModelConfig
    params: Params
    tokenizer: Optional[Tokenizer] = None
    source: str = ""
    label_names: tuple = ()  # classifier label names, id order (from the run's data.label_names)

    def __post_init__(self):
        self._apply = None

    # -- forward ---------------------------------------------------------------------------
    def outputs(self, input_ids: Any, attention_mask: Any = None, decoder_input_ids: Any = None,
                decoder_attention_mask: Any = None, token_type_ids: Any = None) -> dict:
        """Every named output of the model (logits, hidden, pooled, nsp_logits, ...) as numpy.

        attention_mask (1 = token, 0 = padding) becomes llmjax's segment ids; outputs at
        padding positions are not meaningful.
        """
        from llmjax.models import Transformer

        if self._apply is None:
            model = Transformer(self.config)
            self._apply = jax.jit(lambda params, kw: model.apply({"params": params}, **kw))
        from llmjax.generate import check_token_ids

        ids = check_token_ids(input_ids, self.config.vocab_size)
        if ids.ndim == 1:
            ids = ids[None]
        kw: dict[str, Any] = {"tokens": ids}
        if attention_mask is not None:
            kw["segment_ids"] = np.asarray(attention_mask, np.int32).reshape(ids.shape)
        if token_type_ids is not None:
            kw["token_types"] = check_token_ids(
                token_type_ids, max(self.config.num_token_types, 1), "token_type_ids",
                "model.num_token_types").reshape(ids.shape)
        if self.config.architecture == "encoder_decoder":
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids")
            dec = check_token_ids(decoder_input_ids, self.config.vocab_size,
                                  "decoder_input_ids").reshape(ids.shape[0], -1)
            kw["decoder_tokens"] = dec
            if decoder_attention_mask is not None:
                kw["decoder_segment_ids"] = np.asarray(decoder_attention_mask,
                                                       np.int32).reshape(dec.shape)
        elif decoder_input_ids is not None:
            raise ValueError(f"decoder_input_ids is only for encoder-decoder models; this one "
                             f"is {self.config.architecture!r}")
        return {k: np.asarray(v) for k, v in self._apply(self.params, kw).items()}

    def logits(self, input_ids: Any, attention_mask: Any = None, decoder_input_ids: Any = None,
               **kwargs: Any) -> np.ndarray:
        """[batch, length, vocab] fp32 logits (LM or MLM head); a bare encoder returns its
        hidden states [batch, length, d_model]."""
        out = self.outputs(input_ids, attention_mask, decoder_input_ids, **kwargs)
        return out["logits"] if "logits" in out else out["hidden"]

    # -- classification --------------------------------------------------------------------
    def classify(self, texts: Any, max_length: Optional[int] = None, batch_size: int = 64) -> Any:
        """Label and per-label probabilities of each text (a string, or a (text, pair) tuple):
        a list of `llmjax.classify.Prediction(label, probabilities)`; one text in, one out.
        Framed as in training: [CLS] text [SEP] (pair [SEP]), cut to max_length (model.max_len)."""
        from llmjax.classify import classify

        return classify(self, texts, max_length, batch_size)

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
                 max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, eos_id: Any = "default",
                 chat: bool = False) -> Any:
        """Continue a prompt: text in -> text out (needs a tokenizer), ids in -> ids out.

        chat=True wraps text prompts in the tokenizer's chat template (a user turn).
        """
        from llmjax.generate import check_sampling, generate

        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)  # before any encoding
        texts = isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and len(prompt) > 0
                                            and isinstance(prompt[0], str))
        special = getattr(self.tokenizer, "special_ids", {}) if self.tokenizer else {}
        if eos_id == "default":
            eos_id = special.get("eos")
            if self.tokenizer is not None and hasattr(self.tokenizer, "token_to_id"):
                end = self.tokenizer.token_to_id("<|im_end|>")
                if end is not None:
                    eos_id = [e for e in (eos_id, end) if e is not None]
        if texts:
            if self.tokenizer is None:
                raise ConfigError(f"{self.source or 'this model'} has no tokenizer to encode the "
                                  f"prompt: pass token ids, or save the model with its tokenizer")
            items = [prompt] if isinstance(prompt, str) else list(prompt)
            if chat:
                items = [self.tokenizer.apply_chat_template([{"role": "user", "content": t}])
                         for t in items]
            ids = [self.tokenizer.encode(t) for t in items]
        else:
            ids = prompt
        start = special.get("pad", 0) if self.config.architecture == "encoder_decoder" else 0
        out = generate(self.config, self.params, ids, max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                       seed=seed, pad_id=special.get("pad", 0), decoder_start_id=start)
        if texts:
            decoded = [self.tokenizer.decode(o) for o in out]
            return decoded[0] if isinstance(prompt, str) else decoded
        return out

    # -- saving ----------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, force: bool = False) -> Path:
        """An llmjax parameter export (config.yaml + params/, tokenizer/ when known):
        what `train.init_from` and from_pretrained read. `directory` must be new or empty;
        force=True replaces an earlier export; a training run directory is never written."""
        from llmjax.checkpoint.params import save_params
        from llmjax.convert.hf import LLMJAX_TOKENIZER_FILES, TOKENIZER_FILES, copy_tokenizer_files
        from llmjax.outdir import staged_export

        with staged_export(directory, "llmjax", force, "save", "force=True") as local:
            if local is not None:  # object storage: written locally, then uploaded
                self.save(local)
                return paths.resolve(directory, "directory")
        directory = save_params(directory, self.params, self.config, force=force)
        if self.label_names:
            import json

            (Path(directory) / LABELS_FILE).write_text(json.dumps(list(self.label_names)) + "\n")
        tok_dir = _tokenizer_dir(self.tokenizer)
        if tok_dir is not None:
            copy_tokenizer_files(tok_dir, Path(directory) / TOKENIZER_SUBDIR,
                                 TOKENIZER_FILES + LLMJAX_TOKENIZER_FILES)
        return Path(directory)

    def finetune(self, config: dict, run_dir: str | os.PathLike, **train_kwargs: Any
                 ) -> "PretrainedModel":
        """Fine-tune this model with llmjax's trainer and return the result.

        `config` holds the run's sections (data, objective, peft, optimizer, train, ...) as
        in a YAML file; the model section and train.init_from come from this model, and
        data.tokenizer defaults to its tokenizer. The base is exported to run_dir/base, unless
        this model was loaded from an llmjax export that still holds exactly these parameters:
        then the run references that export (PEFT checkpoints check its fingerprint).
        """
        from llmjax.config import from_dict
        from llmjax.train.trainer import train

        run_dir = (paths.resolve(run_dir, "run_dir") if paths.is_remote(paths.check(run_dir, "run_dir"))
                   else Path(run_dir).expanduser())  # pathlib would turn gs://b/x into gs:/b/x
        # An unchanged llmjax export is referenced where it is, not copied into the run.
        # force: a resumed finetune rewrites the base export it wrote before.
        base = _unchanged_export(self) or self.save(run_dir / "base", force=True)
        data = {section: dict(values) for section, values in config.items()}
        if "model" in data:
            raise ValueError("finetune takes the model from this object: set ModelConfig "
                             "fields through from_pretrained(..., **overrides) instead")
        data["model"] = dataclasses.asdict(self.config)
        data.setdefault("train", {}).update(init_from=str(base), run_dir=str(run_dir))
        if (base / TOKENIZER_SUBDIR).is_dir():
            data.setdefault("data", {}).setdefault("tokenizer", str(base / TOKENIZER_SUBDIR))
        run_config = from_dict(data)
        from llmjax.data.labelled import check_num_labels

        check_num_labels(run_config.data, run_config.model)
        result = train(run_config, **train_kwargs)
        if result.exit_code:
            raise RuntimeError(f"fine-tuning stopped early (exit code {result.exit_code}); "
                               f"call finetune again with the same run_dir to resume")
        return from_pretrained(run_dir)

    def save_hf(self, directory: str | os.PathLike, dtype: str = "float32",
                max_shard_size: int | str = "5GB") -> Path:
        """A Hugging Face directory: config.json, safetensors weights in `dtype` (sharded with
        an index beyond `max_shard_size`, like save_pretrained) and the tokenizer files."""
        from llmjax.convert.hf import export_hf
        from llmjax.outdir import staged_export

        with staged_export(directory, "hf", True, "save_hf") as local:
            if local is not None:  # object storage: written locally, then uploaded
                self.save_hf(local, dtype=dtype, max_shard_size=max_shard_size)
                return paths.resolve(directory, "directory")
        out = export_hf(self.config, self.params, directory, dtype=dtype,
                        max_shard_size=max_shard_size, tokenizer=self.tokenizer)
        if self.label_names:  # HF keeps a classifier's label names in config.json
            import json

            path = Path(out) / "config.json"
            hf = json.loads(path.read_text())
            hf["id2label"] = {str(i): name for i, name in enumerate(self.label_names)}
            hf["label2id"] = {name: i for i, name in enumerate(self.label_names)}
            path.write_text(json.dumps(hf, indent=2) + "\n")
        return out


def _unchanged_export(model: PretrainedModel) -> Optional[Path]:
    """The llmjax parameter export `model` was loaded from, if its parameters on disk are
    still exactly model.params (same fingerprint); None otherwise (HF, GGUF, runs, edits)."""
    path = Path(model.source) if model.source else None
    if path is None or not (path / "config.yaml").is_file() or not (path / "params").is_dir():
        return None
    from llmjax.checkpoint.params import load_params
    from llmjax.peft.base_ref import fingerprint
    from llmjax.tree import flatten
    try:
        on_disk, config = load_params(path)
    except Exception:  # noqa: BLE001 (unreadable: fall back to a copy)
        return None
    if config.get("kind") or fingerprint(flatten(on_disk)) != fingerprint(flatten(model.params)):
        return None
    return path.absolute()


def _tokenizer_dir(tokenizer: Any) -> Optional[Path]:
    from llmjax.convert.hf import _tokenizer_source

    return _tokenizer_source(tokenizer)[1]


def _load_tokenizer(directory: Path) -> Optional[Tokenizer]:
    from llmjax.data.tokenizer import load_any_tokenizer

    for candidate in (directory / TOKENIZER_SUBDIR, directory):
        if candidate.is_dir():
            tok = load_any_tokenizer(candidate)
            if tok is not None:
                return tok
    return None


def _run_label_names(run: dict, cfg: ModelConfig) -> tuple:
    """The classifier's label names a run recorded (data.label_names), when they fit its head."""
    names = tuple(run.get("data", {}).get("label_names") or ())
    return names if cfg.num_labels and len(names) == cfg.num_labels else ()


def _export_label_names(directory: Path) -> tuple:
    import json

    path = directory / LABELS_FILE
    return tuple(json.loads(path.read_text())) if path.exists() else ()


def from_pretrained(path: str | os.PathLike, scan_layers: bool = True,
                    **overrides: Any) -> PretrainedModel:
    """Load an llmjax training run (its latest checkpoint) or export (config.yaml), an HF
    directory (config.json + safetensors) or a GGUF file. `overrides` set ModelConfig fields (e.g. dtype="bfloat16", max_len=2048).
    On object storage (gs://) it is fetched once into the local cache (paths.local_copy)."""
    if paths.is_remote(paths.check(path, "path")):
        path = paths.local_copy(path, "path")
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":  # converted once, cached (gguf_cache.py)
        from llmjax.convert.gguf_cache import load_gguf

        return load_gguf(path, scan_layers=scan_layers, **overrides)
    if (path / "checkpoints").is_dir() or (path / "state").is_dir() or \
            (path / "config.yaml").exists():  # a training run or an llmjax export
        from llmjax.loader import is_run, load_model

        loaded = load_model(path)
        run = is_run(path)
        if run:
            cfg = dataclasses.replace(loaded.model, **overrides) if overrides else loaded.model
        else:
            from llmjax.config import section_from_dict

            model = dataclasses.asdict(loaded.model)
            model.update(overrides)
            cfg = section_from_dict(ModelConfig, model, "model")
            cfg.validate()
        params = loaded.params
        if cfg.scan_layers != scan_layers:
            from llmjax.tree import stack_layers, unstack_layers

            params = stack_layers(params) if scan_layers else unstack_layers(params)
            cfg = dataclasses.replace(cfg, scan_layers=scan_layers)
        if run:
            from llmjax.data.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(Path(loaded.tokenizer)) if loaded.tokenizer else None
            return PretrainedModel(cfg, params, tokenizer, str(path),
                                   _run_label_names(loaded.config, cfg))
        return PretrainedModel(cfg, params, _load_tokenizer(path), str(path),
                               _export_label_names(path))
    if (path / "config.json").exists():
        from llmjax.convert.hf import import_hf, read_hf_config

        cfg, params = import_hf(path, scan_layers=scan_layers, **overrides)
        id2label = read_hf_config(path).get("id2label") or {}
        names = tuple(id2label.get(str(i), str(i)) for i in range(cfg.num_labels)) if id2label else ()
        return PretrainedModel(cfg, params, _load_tokenizer(path), str(path), names)
    raise FileNotFoundError(f"{path}: not an llmjax export (config.yaml), a Hugging Face "
                            f"directory (config.json) or a .gguf file")

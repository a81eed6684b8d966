"""Interop: Hugging Face safetensors <-> llmjax trees (GPT-2, BERT, T5, LLaMA), GGUF import and
export, imported tokenizers and HF-PEFT LoRA export. torch is never needed; no pickle is loaded."""
from llmjax.errors import ConversionError
from llmjax.convert.gguf import import_gguf
from llmjax.convert.gguf_export import export_gguf
from llmjax.convert.hf import export_hf, import_hf, supported_architectures
from llmjax.convert.peft_export import export_lora, merge_lora
from llmjax.data.tokenizer import HFTokenizer, SentencePieceModelTokenizer, load_any_tokenizer

__all__ = ["ConversionError", "HFTokenizer", "SentencePieceModelTokenizer", "export_hf",
           "export_gguf", "export_lora", "import_gguf", "import_hf", "load_any_tokenizer", "merge_lora",
           "supported_architectures"]

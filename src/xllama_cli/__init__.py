"""xllama: inference and checkpoint tools for Llama-family models."""

__version__ = "0.1.0"

__all__ = ["load_model", "load_tokenizer", "generate", "ModelConfig", "Transformer", "XllamaError",
           "format_llama2_chat", "ChatSession", "render_chat_template"]


def __getattr__(name: str):
    # torch loads only when the API is used, so `xllama --help` stays fast
    if name == "load_model":
        from .loading import load_model
        return load_model
    if name == "load_tokenizer":
        from .tokenizer import load_tokenizer
        return load_tokenizer
    if name == "generate":
        from .generation import generate
        return generate
    if name == "ModelConfig":
        from .config import ModelConfig
        return ModelConfig
    if name == "Transformer":
        from .model import Transformer
        return Transformer
    if name == "XllamaError":
        from .errors import XllamaError
        return XllamaError
    if name == "format_llama2_chat":
        from .chat import format_llama2_chat
        return format_llama2_chat
    if name == "ChatSession":
        from .chat import ChatSession
        return ChatSession
    if name == "render_chat_template":
        from .chat_template import render_chat_template
        return render_chat_template
    raise AttributeError(f"module 'xllama_cli' has no attribute {name!r}")

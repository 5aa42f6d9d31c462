"""USF BIOS: self-hostable LoRA / QLoRA fine-tuning."""

__version__ = "0.1.0"

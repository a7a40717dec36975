import QLoRA

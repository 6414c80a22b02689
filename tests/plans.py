"""Plans shared by the PEFT tests (NNX and Linen use the same one)."""

L0 = "encoder/layers_0"
#: Every method, nested sites (LoRA inside a prefix-tuned attention inside an adapted block).
MIXED = {
    f"{L0}/attention/mha/query": ("lora", 2),
    f"{L0}/attention/mha/out": ("lora", 3),
    f"{L0}/attention/mha": ("prefix", 3),
    f"{L0}/attention": ("adapter", 4),
    "encoder/layers_1/mlp/intermediate": ("lora", 3),
    "encoder/layers_1/mlp": ("adapter", 2),
    "embeddings/word": ("lora", 2),
    "classifier": ("lora", 1),
}

"""The tiny Hugging Face configs the tests build models from (a few KB each, built in ms)."""

#: A ViT: 32x32 images in 8x8 patches, two layers 32 wide.
TINY_VIT = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)

#: A Llama: two layers 32 wide, grouped-query attention (4 heads, 2 key/value heads), 64 tokens.
TINY_LLAMA = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
)

"""The base model: the from-scratch decoder, its tokenizer, NF4 quantization, pretraining and the base on disk."""

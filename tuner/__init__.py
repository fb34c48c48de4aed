"""pyllm.tuner: LoRA / QLoRA fine-tuning on a frozen GGUF model, with a hand-written backward.

    import pyllm
    pyllm.finetune("base.gguf", data="train.jsonl", output="adapter.gguf", iters=300, rank=8)

ops.py (each op's forward and backward), model.py (the LoRA'd decoder), data.py (jsonl to
token batches), optim.py (AdamW, schedules), trainer.py (the loop: accumulation, clipping,
checkpoints, data parallel, progress), adapter.py (adapter GGUF, PEFT export, fusing).
"""

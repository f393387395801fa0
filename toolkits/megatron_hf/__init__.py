"""Megatron <-> HuggingFace checkpoint conversion for LLaMA2 and BLOOM without Megatron-LM.

    convert.py          CLI (`python -m toolkits.megatron_hf.convert mg2hf|hf2mg ...`)
    megatron_to_hf.py   driver: rank files -> safetensors shards, layer by layer
    hf_to_megatron.py   driver: HF shards -> rank files, layer by layer
    megatron_format.py  Megatron layout on disk, safe (no-code) unpickling, canonical names, writing ranks
    hf_format.py        HF folders: lazy reading, streaming safetensors writer, tokenizer files, staged output
    tensor_parallel.py  how tensors are split over TP ranks (the only reshapes in the project)
    llama2.py, bloom.py name maps, presets, HF configs and Megatron args per family
"""

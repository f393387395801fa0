"""Megatron <-> HuggingFace checkpoint conversion for the LLaMA family and BLOOM without Megatron-LM.

    convert.py          CLI (`python -m toolkits.megatron_hf.convert mg2hf|hf2mg ...`)
    megatron_to_hf.py   driver: rank files -> safetensors shards, layer by layer
    hf_to_megatron.py   driver: HF shards -> rank files, layer by layer
    megatron_format.py  Megatron layout on disk, safe (no-code) unpickling, canonical names, writing ranks
    mcore_format.py     Megatron-Core names, torch_dist reading (torch's own reader) and writing
    hf_format.py        HF folders: lazy reading, streaming safetensors writer, tokenizer files, staged output
    tensor_parallel.py  how tensors are split over TP ranks (the only reshapes in the project)
    llama2.py, bloom.py name maps (llama2.py: LLaMA2, Llama 3/3.1, Qwen2), presets, HF configs and Megatron args per family
"""

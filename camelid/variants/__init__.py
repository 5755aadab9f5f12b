"""Models derived from the reference (camelid/model.py) from outside it, by functions that replace its child
modules with new module objects holding the same tensors:

    fused.fuse(model)                       inference: one qkv and one gate/up product, C++ norm and attention
    quantized.quantize_model(model, mode)   fused + int8 / int4 / fp32-GEMV linear layers; save/load_quantized
    training.for_training(model)            training: C++ attention, norms, SwiGLU, RoPE; fused head + loss
    decode_step.decode_step(model)          the whole batch-1 decode step of a fused model in one C++ call
"""

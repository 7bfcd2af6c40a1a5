"""Loading an exported GGUF in llama.cpp (llama-cpp-python), for the export's tests and bench_gguf.py."""


def load_llama_cpp(path, **kwargs):
    """llama-cpp-python's `Llama` on the GGUF at `path`, without llama.cpp's extra (weight-repacking) buffer types.

    On CPUs with AMX (Sapphire Rapids) ggml repacks Q4_0 weights into its AMX buffer, whose matmul segfaults
    (ggml-org/llama.cpp#20824; measured here on a Xeon with amx_int8: the whole test process died). The plain CPU
    kernels compute the same model. llama-cpp-python has no keyword for `use_extra_bufts`, so the default model
    parameters are wrapped for the one call."""
    import llama_cpp
    from llama_cpp import llama_cpp as capi

    default = capi.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    capi.llama_model_default_params = params
    try:
        return llama_cpp.Llama(model_path=str(path), **kwargs)
    finally:
        capi.llama_model_default_params = default

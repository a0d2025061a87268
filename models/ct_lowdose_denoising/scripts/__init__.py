"""Code of the ct_lowdose_denoising bundle that its configs cannot express."""

"""The quantiser on a real GPU (faiss-gpu): its searches run there and agree with the
CPU's. Skipped where faiss has no GPU classes or sees no GPU; tests/test_quantize.py
covers the dispatch with stand-ins everywhere."""

import faiss
import numpy as np
import pytest

from diffgrm_dist.core.config import TokenizeConfig
from diffgrm_dist.tokenize import quantize
from diffgrm_dist.tokenize.quantize import Quantizer, gpu_count

pytestmark = pytest.mark.skipif(not gpu_count(), reason="needs faiss-gpu and a GPU")


@pytest.mark.parametrize("kind", ["opq", "rq_kmeans"])
def test_quantizer_on_a_real_gpu(monkeypatch, kind):
    x = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32)
    cfg = TokenizeConfig(quantizer=kind, digits=4, codebook_size=16, pca_dim=32, opq_iters=2, kmeans_iters=3)
    q = Quantizer.fit(x, cfg)
    codes = q.encode(x)
    assert (q.fit_device, q.encode_device) == ("gpu", "gpu")
    assert isinstance(quantize.flat_l2_index(8), faiss.GpuIndexFlatL2)
    assert codes.shape == (4000, 4) and codes.min() >= 0 and codes.max() < 16
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0)
    cpu_codes = q.encode(x)
    assert q.encode_device == "cpu"
    assert (cpu_codes == codes).mean() > 0.99  # equal but for float32 near-ties

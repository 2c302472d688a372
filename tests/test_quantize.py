import faiss
import numpy as np
import pytest

from diffgrm_dist.core.config import TokenizeConfig
from diffgrm_dist.core.errors import ConfigError
from diffgrm_dist.tokenize import quantize
from diffgrm_dist.tokenize.quantize import Quantizer, assign_sids, code_stats, flat_l2_index
from diffgrm_dist.tokenize.stage import QuantizeWorker


def test_assign_sids_by_hand():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 3], [1, 2]])
    expand = assign_sids(codes, "expand")
    assert expand.codes.tolist() == codes.tolist()
    assert expand.collision_rank.tolist() == [0, 0, 1, 0, 2]
    assert expand.group_size.tolist() == [3, 1, 3, 1, 3]
    extra = assign_sids(codes, "extra_digit")
    assert extra.codes.tolist() == [[1, 2, 0], [0, 0, 0], [1, 2, 1], [3, 3, 0], [1, 2, 2]]
    assert len({tuple(c) for c in extra.codes.tolist()}) == len(codes)
    with pytest.raises(ConfigError):
        assign_sids(codes, "last_wins")
    by_popularity = assign_sids(codes, "expand", priority=np.array([1, 0, 5, 0, 5]))
    assert by_popularity.collision_rank.tolist() == [2, 0, 0, 0, 1]  # ties by item index


def test_code_stats_by_hand():
    codes = np.array([[0, 1], [0, 1], [1, 1], [1, 0]])
    stats = code_stats(codes, assign_sids(codes, "expand"), codebook_size=2)
    assert stats["items"] == 4 and stats["distinct_codes"] == 3
    assert stats["colliding_items"] == 2 and stats["max_items_per_code"] == 2
    assert stats["digit_usage"] == [2, 2]
    assert stats["digit_entropy_bits"][0] == 1.0
    assert stats["digit_entropy_bits"][1] == pytest.approx(0.8113, abs=1e-4)


def clustered(n=600, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, dim))
    x = centres[rng.integers(0, 12, n)] + 0.3 * rng.standard_normal((n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@pytest.mark.parametrize("kind", ["opq", "rq_kmeans"])
def test_quantizer_fit_encode_save_load(tmp_path, kind):
    x = clustered()
    cfg = TokenizeConfig(quantizer=kind, digits=4, codebook_size=16, pca_dim=32, opq_iters=3,
                         kmeans_iters=5)
    q = Quantizer.fit(x[:500], cfg)
    codes = q.encode(x)
    assert codes.shape == (600, 4) and codes.min() >= 0 and codes.max() < 16
    assert np.array_equal(codes, Quantizer.fit(x[:500], cfg).encode(x))  # seeded
    q.save(tmp_path / "q", extra={"model": "m"})
    loaded, meta = Quantizer.load(tmp_path / "q")
    assert meta["model"] == "m" and meta["kind"] == kind
    assert np.array_equal(loaded.encode(x), codes)
    # Codes carry information: nearby vectors share more digits than random pairs.
    same = (codes[:300] == codes[300:]).mean()
    near = x + 0.01 * np.random.default_rng(1).standard_normal(x.shape).astype(np.float32)
    assert (q.encode(near) == codes).mean() > same + 0.3


def test_opq_digits_are_balanced_and_rq_first_digit_is_coarsest():
    x = clustered(n=2000, dim=64)
    kw = dict(digits=4, codebook_size=16, pca_dim=32, opq_iters=5, kmeans_iters=10)
    opq = Quantizer.fit(x, TokenizeConfig(quantizer="opq", **kw)).encode(x)
    rq = Quantizer.fit(x, TokenizeConfig(quantizer="rq_kmeans", **kw)).encode(x)
    for codes in (opq, rq):
        assert len(np.unique(codes, axis=0)) > 200
    # OPQ spreads information over all digits; every digit uses most of its codebook.
    assert min(len(np.unique(opq[:, m])) for m in range(4)) >= 12


def test_bad_quantizer_settings():
    x = clustered(n=100, dim=64)
    with pytest.raises(ConfigError, match="power of 2"):
        Quantizer.fit(x, TokenizeConfig(codebook_size=10))
    with pytest.raises(ConfigError, match="fewer than codebook_size"):
        Quantizer.fit(x, TokenizeConfig(codebook_size=256))
    with pytest.raises(ConfigError, match="exceeds the embedding dimension 64"):
        Quantizer.fit(x, TokenizeConfig(codebook_size=16, pca_dim=256))
    with pytest.raises(ConfigError, match="set tokenize.pca_dim below 40"):
        Quantizer.fit(x[:40], TokenizeConfig(codebook_size=16, digits=4, pca_dim=0))  # 40 points, 64 dims
    with pytest.raises(ConfigError, match="does not divide"):
        Quantizer.fit(x, TokenizeConfig(codebook_size=16, digits=3, pca_dim=0))


class FakeGpu:
    """Stand-ins for faiss-gpu's classes (faiss-cpu has none): the resources count how
    often they are made, the GPU index is a CPU flat index that records every instance."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.resources: list[object] = []
        self.indexes: list[faiss.IndexFlatL2] = []
        fake = self

        class Resources:
            def __init__(self) -> None:
                fake.resources.append(self)

        class GpuIndexFlatL2(faiss.IndexFlatL2):
            def __init__(self, resources: Resources, dim: int) -> None:
                assert isinstance(resources, Resources)
                super().__init__(dim)
                fake.indexes.append(self)

        quantize.gpu_resources.cache_clear()
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
        monkeypatch.setattr(faiss, "StandardGpuResources", Resources, raising=False)
        monkeypatch.setattr(faiss, "GpuIndexFlatL2", GpuIndexFlatL2, raising=False)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Installs ``FakeGpu`` when called; the cached resources never outlive the test."""
    yield lambda: FakeGpu(monkeypatch)
    quantize.gpu_resources.cache_clear()


@pytest.mark.parametrize("kind", ["opq", "rq_kmeans"])
def test_flat_l2_dispatch_gpu_and_cpu(tmp_path, fake_gpu, kind):
    """With a GPU in sight every nearest-centroid search (fit and encode) is built through
    GpuIndexFlatL2 and gives the CPU path's codes exactly; without one all is IndexFlatL2."""
    x = np.random.default_rng(0).standard_normal((600, 32)).astype(np.float32)
    cfg = TokenizeConfig(quantizer=kind, digits=4, codebook_size=16, pca_dim=0, opq_iters=2, kmeans_iters=3)
    assert type(flat_l2_index(8)) is faiss.IndexFlatL2
    cpu = Quantizer.fit(x, cfg)
    cpu_codes = cpu.encode(x)
    assert (cpu.fit_device, cpu.encode_device) == ("cpu", "cpu")
    cpu.save(tmp_path / "q")
    files = {p.name: p.read_bytes() for p in (tmp_path / "q").iterdir()}
    assert QuantizeWorker(files, 0).encode(7, x)[2] == "cpu"  # what a tokenize actor reports

    gpu = fake_gpu()
    q = Quantizer.fit(x, cfg)
    fitted = list(gpu.indexes)
    # OPQ: the assign index of OPQ's inner PQ and of the final PQ (sub-space dim 8);
    # RQ: per level, k-means' index and the residual's nearest-centroid search.
    dims = [8, 8] if kind == "opq" else [32] * 8
    assert [index.d for index in fitted] == dims
    assert all(index.ntotal == 16 for index in fitted)  # faiss searched them: they hold centroids
    assert np.array_equal(q.centroids, cpu.centroids)
    codes = q.encode(x)
    assert [index.d for index in gpu.indexes[len(fitted):]] == [8 if kind == "opq" else 32] * 4
    assert np.array_equal(codes, cpu_codes)
    assert (q.fit_device, q.encode_device) == ("gpu", "gpu")
    block, worker_codes, device = QuantizeWorker(files, 0).encode(7, x)
    assert (block, device) == (7, "gpu") and np.array_equal(worker_codes, cpu_codes)
    assert len(gpu.resources) == 1  # one StandardGpuResources per process, not per index

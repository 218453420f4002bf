"""``kebench leaderboard``: paired bootstrap intervals, ranking and ties, the reference row, the drill-down,
a plug-in method installed into a fresh virtualenv, and the HTML page in a real (headless) browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from benchmarks.data import resolve_data_dir
from helpers import put_cell
from results.leaderboard import leaderboard_groups, write_leaderboard
from results.views import connect

REPO = Path(__file__).resolve().parent.parent


def _hand_interval(values: list[float], indices: np.ndarray) -> tuple[float, float]:
    means = np.asarray(values)[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def test_bootstrap_intervals_equal_hand_computed_ones(tmp_path: Path) -> None:
    rel_a, loc_a = [1.0, 0.0, 1.0, 1.0, 0.5, 1.0], [1.0, 1.0, 0.5, 1.0, 1.0, 0.0]
    rel_b, loc_b = [0.0, 0.0, 1.0, 0.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    put_cell(tmp_path, "A", 1, {"rel": rel_a, "loc": loc_a}, scenario="single")
    put_cell(tmp_path, "B", 1, {"rel": rel_b, "loc": loc_b}, scenario="single")
    with connect(tmp_path) as con:
        (group,) = leaderboard_groups(con, resamples=1000, seed=7)
    # The documented procedure, by hand: one index matrix for both methods (paired), percentiles of means.
    indices = np.random.default_rng(7).integers(0, 6, size=(1000, 6))
    by_label = {entry.label: entry for entry in group.entries}
    for label, rel, loc in (("A", rel_a, loc_a), ("B", rel_b, loc_b)):
        estimates = by_label[label].estimates
        assert estimates["rel"].mean == pytest.approx(np.mean(rel))
        assert (estimates["rel"].low, estimates["rel"].high) == pytest.approx(_hand_interval(rel, indices))
        assert (estimates["loc"].low, estimates["loc"].high) == pytest.approx(_hand_interval(loc, indices))
        avg = (np.asarray(rel)[indices].mean(axis=1) + np.asarray(loc)[indices].mean(axis=1)) / 2
        assert (estimates["avg"].low, estimates["avg"].high) == pytest.approx(tuple(np.percentile(avg, [2.5, 97.5])))
    assert [e.label for e in group.entries] == ["A", "B"]  # Avg 0.75 vs 0.54
    assert group.entries[0].status == "leader"
    expected_tie = by_label["B"].estimates["avg"].high >= by_label["A"].estimates["avg"].low
    assert (group.entries[1].status == "tied") == expected_tie


def _hand_hierarchical(values: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The hierarchical bootstrap by hand, loop by loop: the documented draws (cases, then seeds, from one
    generator), each resample the mean over its seed slots of the slot's mean over its drawn cases."""
    n_seeds, n_cases = values.shape
    rng = np.random.default_rng(seed)
    cases = rng.integers(0, n_cases, size=(resamples, n_seeds, n_cases))
    seeds = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    stats = []
    for r in range(resamples):
        slot_means = [np.mean([values[seeds[r, j], cases[r, j, k]] for k in range(n_cases)]) for j in range(n_seeds)]
        stats.append(np.mean(slot_means))
    low, high = np.percentile(stats, [2.5, 97.5])
    return float(low), float(high)


def test_three_seeds_mean_sd_and_hierarchical_interval_by_hand(tmp_path: Path) -> None:
    # [seed][case]: method A varies from seed to seed, B less so
    rel = {"A": [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.5], [1.0, 1.0, 1.0, 0.0]],
           "B": [[0.0, 0.5, 0.0, 1.0], [0.0, 0.5, 0.5, 1.0], [0.5, 0.5, 0.0, 1.0]]}
    loc = {"A": [[1.0, 1.0, 0.5, 1.0], [1.0, 0.0, 1.0, 1.0], [0.5, 1.0, 1.0, 1.0]],
           "B": [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0]]}
    for label in ("A", "B"):
        for seed in (0, 1, 2):
            put_cell(tmp_path, label, 10, {"rel": rel[label][seed], "loc": loc[label][seed]}, seed=seed)
    with connect(tmp_path) as con:
        (group,) = leaderboard_groups(con, resamples=200, seed=3)
    assert group.seeds == (0, 1, 2) and group.cases == 4 and "3 seeds (0, 1, 2) × 4 cases" in group.noise
    by_label = {entry.label: entry.estimates for entry in group.entries}
    for label in ("A", "B"):
        r, lo = np.asarray(rel[label]), np.asarray(loc[label])
        for metric, values in (("rel", r), ("loc", lo), ("avg", (r + lo) / 2)):
            estimate = by_label[label][metric]
            per_seed = values.mean(axis=1)  # each seed's mean over its cases
            assert estimate.mean == pytest.approx(per_seed.mean()) and estimate.seeds == 3
            assert estimate.sd == pytest.approx(np.std(per_seed, ddof=1))
            # the same draws for both methods (paired), so each interval is the hand computation over them
            assert (estimate.low, estimate.high) == pytest.approx(_hand_hierarchical(values, 200, 3))
    assert by_label["A"]["rel"].mean == pytest.approx((0.75 + 0.375 + 0.75) / 3)
    assert by_label["A"]["rel"].sd == pytest.approx(np.std([0.75, 0.375, 0.75], ddof=1))
    page_md, _ = write_leaderboard(tmp_path, tmp_path / "lb", resamples=200, seed=3)
    text = page_md.read_text()
    a_rel = by_label["A"]["rel"]
    assert f"{a_rel.mean:.2f} ± {a_rel.sd:.2f} [{a_rel.low:.2f}, {a_rel.high:.2f}]" in text
    assert "Noise: 3 seeds (0, 1, 2) × 4 cases: mean over seeds ± sd over seeds; intervals resample the seeds" in text


def test_one_seed_keeps_the_one_level_case_bootstrap(tmp_path: Path) -> None:
    """With one seed the hierarchical draws are the case draws of before: intervals do not move."""
    put_cell(tmp_path, "A", 1, {"rel": [1.0, 0.0, 1.0, 0.5, 0.0]}, scenario="single")
    with connect(tmp_path) as con:
        (group,) = leaderboard_groups(con, resamples=300, seed=5)
    estimate = group.entries[0].estimates["rel"]
    indices = np.random.default_rng(5).integers(0, 5, size=(300, 5))
    assert (estimate.low, estimate.high) == pytest.approx(_hand_interval([1.0, 0.0, 1.0, 0.5, 0.0], indices))
    assert estimate.sd is None and estimate.seeds == 1 and "1 seed (0) × 5 cases" in group.noise


def test_hardware_is_grouped_and_a_mixed_group_is_flagged(tmp_path: Path) -> None:
    from kebench.core.numerics import hardware_label

    portable = {"cpu": "AMD EPYC", "torch": "2.13.0+cpu", "isa": "AVX2", "mkl": "2024.2", "mkl_cnr": "COMPATIBLE",
                "numerics": "portable", "threads": 1}
    native = {**portable, "isa": "AVX512", "mkl_cnr": "OFF", "numerics": "native"}
    for label, record in (("A", portable), ("B", native)):
        put_cell(tmp_path, label, 1, {"rel": [1.0, 0.5]}, scenario="single", hardware=record)
    with connect(tmp_path) as con:
        (group,) = leaderboard_groups(con, resamples=50)
    assert group.hardware == tuple(sorted([hardware_label(portable), hardware_label(native)]))
    page_md, page_html = write_leaderboard(tmp_path, tmp_path / "lb", resamples=50)
    text = page_md.read_text()
    assert "Warning: this group mixes 2 hardware configurations" in text
    assert f"| {hardware_label(native)} | 1 | smollm2-135m · B |" in text
    assert "- Warning: the table Single editing mixes hardware configurations" in text
    assert "mixes hardware configurations" in page_html.read_text()


def test_reference_first_ties_failed_cells_and_drilldown(tmp_path: Path) -> None:
    artifact = {"cases": {"q1": {"prompt": "Who wrote Hamlet?", "target": "Marlowe", "rephrase": [], "stream": 0,
                                 "details": {"teacher_forced": {"rel_output": " Shakes"}}}}, "streams": [{}]}
    put_cell(tmp_path, "unedited", 1, {"rel": [0.0, 0.0], "loc": [1.0, 1.0]}, scenario="single")
    put_cell(tmp_path, "good", 1, {"rel": [1.0, 1.0], "loc": [1.0, 1.0]}, scenario="single")
    put_cell(tmp_path, "close", 1, {"rel": [1.0, 0.0], "loc": [1.0, 1.0]}, scenario="single", artifact=artifact)
    put_cell(tmp_path, "far", 1, {"rel": [0.0, 0.0], "loc": [0.0, 0.0]}, scenario="single")
    put_cell(tmp_path, "broken", 1, status="failed", scenario="single")
    page_md, page_html = write_leaderboard(tmp_path, tmp_path / "lb", resamples=200)
    text = page_md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ref.") or re.match(r"\| \d+ \|", line)]
    assert rows[0].startswith("| ref. | unedited |")  # the reference first, not ranked
    assert rows[1].startswith("| 1 | **good** |") and rows[1].endswith("| leader |")
    assert rows[2].startswith("| 2 | close |") and rows[2].endswith("| tied |")  # [0.5,1.0] overlaps [1,1]
    assert rows[3].startswith("| 3 | far |") and rows[3].endswith("|  |")  # 0.00 [0,0] does not overlap
    assert "| × | broken |" in text and "failed: OOM" in text
    assert "`q1` (Rel. 0.00, Loc. 1.00): 'Who wrote Hamlet?' → target 'Marlowe'; model's argmax: ' Shakes'" in text
    assert "# Provenance" in text and "zsre/test: `x`" in text
    assert "data:image/png;base64," in page_html.read_text()  # the Rel-vs-Loc figure, inline
    assert list((tmp_path / "lb" / "plots").glob("tradeoff-*.png"))


# --------------------------------------------------------------------------- a plug-in, end to end

def _fresh_venv(path: Path) -> Path:
    """A new virtualenv that sees this environment's packages (kebench, torch, ray, pip, setuptools) through a
    .pth file, so the plug-in is installed into an environment of its own and kebench itself is left
    untouched; pip installs into the running interpreter's prefix, the new venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(site, "kebench-parent-env.pth").write_text(
        f"import site, sys; site.addsitedir({ours!r}); sys.path.remove({ours!r}); sys.path.insert(1, {ours!r})\n")
    return python


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.slow  # a fresh venv and pip install, 20 s: `make test-slow`
def test_plugin_method_installed_in_a_fresh_venv_reaches_the_leaderboard(tmp_path: Path) -> None:
    before = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                            text=True).stdout
    python = _fresh_venv(tmp_path / "venv")
    plugin = tmp_path / "plugin_method"
    shutil.copytree(REPO / "examples" / "plugin_method", plugin)  # build outside the repository
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(plugin)],
                   check=True, env=env, cwd=tmp_path)
    listing = subprocess.run([str(python), "-m", "orchestrator.cli", "list"], check=True, capture_output=True,
                             text=True, cwd=tmp_path).stdout
    assert "rank-one-ft (kebench-rank-one)" in listing
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: plugin\nmodels: [tiny-random-llama]\nbenchmarks: [{name: zsre, split: dev, n: 2}]\n"
        "scenarios: [{kind: single}]\nmethods: [unedited, baft, reft, rank-one-ft]\n")
    store = tmp_path / "store"
    run = subprocess.run([str(python), "-m", "orchestrator.cli", "grid", "--grid", str(grid), "--store", str(store),
                          "--num-cpus", "2", "--quiet", "--tables", "none"],
                         capture_output=True, text=True, cwd=tmp_path, env={**env, "KEBENCH_DATA": str(resolve_data_dir())})
    assert run.returncode == 0, run.stderr[-2000:]
    out = tmp_path / "board"
    subprocess.run([str(python), "-m", "orchestrator.cli", "leaderboard", "--store", str(store), "--out", str(out)],
                   check=True, cwd=tmp_path)
    text = (out / "leaderboard.md").read_text()
    labels = re.findall(r"^\| (?:ref\.|\d+) \| \**([\w.-]+?)\** \|", text, flags=re.M)
    assert labels[0] == "unedited" and {"baft", "reft", "rank-one-ft"} <= set(labels[1:4])
    rank_one = next(line for line in text.splitlines() if "| rank-one-ft |" in line or "**rank-one-ft**" in line)
    rel = float(rank_one.split("|")[3].split()[0])
    assert rel > 0.0  # the plug-in really edits: the unedited tiny model scores 0 on these targets
    assert "rank-one-ft" in (out / "leaderboard.html").read_text()
    after = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True).stdout
    assert after == before  # no kebench file changed


# --------------------------------------------------------------------------- the page in a browser

def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        subprocess.run(["apt-get", "update", "-qq"], **quiet)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
                       **quiet)
    return shutil.which("chromium")


_PROBE = """<!DOCTYPE html><html><body><pre id="out">waiting</pre>
<iframe id="page" src="%s" style="width:1200px;height:800px"></iframe>
<script>
document.getElementById('page').addEventListener('load', () => {
  const doc = document.getElementById('page').contentDocument;
  const rows = [...doc.querySelectorAll('table.leaderboard tr.ranked')].map(tr => ({
    group: tr.closest('table').dataset.group, label: tr.dataset.label, rank: tr.dataset.rank,
    ci: [...tr.querySelectorAll('td.ci[data-low]')].map(td => [td.dataset.metric, +td.dataset.low, +td.dataset.high,
                                                               +td.dataset.mean])}));
  const images = [...doc.images].map(img => [img.complete, img.naturalWidth]);
  document.getElementById('out').textContent = 'RES' + 'ULT<<' + JSON.stringify({rows, images}) + '>>' + 'END';
});
</script></body></html>"""


@pytest.mark.timeout(600)
def test_leaderboard_page_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Debian's chromium is not installed and could not be installed (needs root and apt-get)")
    put_cell(tmp_path, "unedited", 1, {"rel": [0.0, 0.0, 0.0], "loc": [1.0, 1.0, 1.0]}, scenario="single")
    put_cell(tmp_path, "baft", 1, {"rel": [1.0, 1.0, 0.5], "loc": [1.0, 0.5, 1.0]}, scenario="single")
    put_cell(tmp_path, "reft", 1, {"rel": [1.0, 1.0, 1.0], "loc": [0.0, 0.5, 0.0]}, scenario="single")
    # the same methods in the wild (issue 27): their own group, ranked on their own Avg. (rel_f1 stays out of it)
    put_cell(tmp_path, "unedited", 1, {"rel": [0.0, 0.0, 0.0], "loc": [1.0, 1.0, 1.0]}, scenario="single", protocol="wild")
    put_cell(tmp_path, "baft", 1, {"rel": [1.0, 0.0, 0.0], "rel_f1": [1.0, 0.5, 0.0], "loc": [1.0, 1.0, 1.0]},
             scenario="single", protocol="wild")
    put_cell(tmp_path, "reft", 1, {"rel": [1.0, 1.0, 1.0], "loc": [1.0, 0.0, 1.0]}, scenario="single", protocol="wild")
    _, page = write_leaderboard(tmp_path, tmp_path / "lb", resamples=200)
    probe = tmp_path / "probe.html"
    probe.write_text(_PROBE % page.as_uri())
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=180).stdout
    match = re.search(r"RESULT&lt;&lt;(.*?)&gt;&gt;END", dom, flags=re.S)
    assert match, f"the page did not load in chromium: {dom[:500]!r}"
    seen = json.loads(match.group(1).replace("&quot;", '"'))
    forced = [r for r in seen["rows"] if r["group"].endswith("· teacher_forced")]
    wild = [r for r in seen["rows"] if r["group"].endswith("· wild")]
    assert len(forced) + len(wild) == len(seen["rows"])
    assert [(r["label"], r["rank"]) for r in forced] == [("unedited", "ref."), ("baft", "1"), ("reft", "2")]
    baft_ci = {metric: (low, high) for metric, low, high, _ in forced[1]["ci"]}
    assert set(baft_ci) == {"rel", "loc", "avg"} and all(low <= high for low, high in baft_ci.values())
    assert [(r["label"], r["rank"]) for r in wild] == [("unedited", "ref."), ("reft", "1"), ("baft", "2")]
    baft_wild = {metric: (low, high, mean) for metric, low, high, mean in wild[2]["ci"]}
    assert set(baft_wild) == {"rel", "rel_f1", "loc", "avg"} and all(low <= high for low, high, _ in baft_wild.values())
    assert baft_wild["avg"][2] == pytest.approx((1 / 3 + 1.0) / 2, abs=1e-5)  # Rel. and Loc.; the F1 is not in Avg.
    assert "protocol-gap" in page.read_text() or list((tmp_path / "lb" / "plots").glob("protocol-gap-*.png"))
    assert seen["images"] and all(complete and width > 0 for complete, width in seen["images"])
    shots = REPO / "runs"
    shots.mkdir(exist_ok=True)
    shot = shots / "leaderboard-screenshot.png"
    subprocess.run([*flags, "--window-size=1280,1400", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=180)
    assert shot.is_file() and shot.stat().st_size > 10_000

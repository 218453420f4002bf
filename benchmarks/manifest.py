"""Every data file a benchmark, the PIQA downstream check or the ``shared-offline`` statistics corpus
reads: where it canonically lives (pinned), its size and its hashes.

``kebench data fetch`` downloads from these sources and ``kebench data status`` checks against them.
Names are relative to a data directory and are the names the loaders use.  Sizes, sha256 and git blob
ids are those of the copies in the team's ``shared/data`` (``PROVENANCE.md``: each copy's git blob id
matches the blob the source repository committed), so a file that passes here has exactly the bytes
the published numbers were computed on.

Two kinds of source:

* ``HubFile``: a Hugging Face dataset repository at a pinned commit, downloaded with
  ``huggingface_hub.hf_hub_download``.  KnowEdit (``zjunlp/KnowEdit``) is the only benchmark with an
  official Hub home.
* ``GitHubFile``: a file in a GitHub repository at a pinned commit (raw.githubusercontent.com),
  downloaded with ``huggingface_hub``'s HTTP client.  ZsRE and CounterFact have no official Hub
  repository (EasyEdit distributes them as a Google Drive zip); the copies whose blob ids were checked
  are the ones EasyEdit forks commit.  PIQA's original release lives on its first author's site
  repository; the Hub's ``ybisk/piqa`` is script-based on ``main`` and its parquet conversion has
  other bytes and another layout than the ``valid.jsonl``/``valid-labels.lst`` pair the check reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union
from urllib.parse import quote

KNOWEDIT_REPO = "zjunlp/KnowEdit"
#: main HEAD; only README commits follow the last data upload (b907eca, 2024-01-28), so the data at this
#: commit is the data KnowEdit published (reference/field-anchors-2026-12.md §4.1)
KNOWEDIT_REVISION = "6d218881e60c7c8be836bd2befd598eb3b318be4"
#: a revision whose ``test_cf.json`` is the 7.57 MB file our copy is; it was re-uploaded on
#: 2024-01-21 (3ec51f9) as a different, 2.92 MB file, which is what KNOWEDIT_REVISION serves
KNOWEDIT_TEST_CF_REVISION = "3ec93ed765d3afa108a4fc24cce509c452aed8e1"

EASYEDIT_FORK = "leonz-z/EasyEdit"  # commits EasyEdit's editing-data release under dataset/edit_data/
EASYEDIT_FORK_COMMIT = "5d49c472bd4b8447a70d276fb577d28088588e62"
PIQA_REPO = "ybisk/ybisk.github.io"  # the PIQA first author's site, the official PIQA data host
PIQA_COMMIT = "21edab439af693b961be2f069e8690a88d3b4e37"

STATS_CORPUS = "shared-offline"  # methods/stats.py: the offline corpus of ROME/MEMIT second moments
EMBEDDED = "zsre/zsre_mend_eval_portability_gpt4.json"  # ships in benchmarks/embedded/


@dataclass(frozen=True)
class HubFile:
    """``path`` in the Hugging Face dataset ``repo`` at commit ``revision``."""

    repo: str
    path: str
    revision: str

    def url(self, endpoint: str) -> str:
        # The URL huggingface_hub.hf_hub_url builds for repo_type="dataset".
        return f"{endpoint.rstrip('/')}/datasets/{self.repo}/resolve/{self.revision}/{quote(self.path)}"

    def label(self) -> str:
        return f"hf://datasets/{self.repo}@{self.revision[:7]}/{self.path}"


@dataclass(frozen=True)
class GitHubFile:
    """``path`` in the GitHub repository ``repo`` at ``commit``."""

    repo: str
    path: str
    commit: str

    def url(self, base: str) -> str:
        return f"{base.rstrip('/')}/{self.repo}/{self.commit}/{quote(self.path)}"

    def label(self) -> str:
        return f"github.com/{self.repo}@{self.commit[:7]}/{self.path}"


Source = Union[HubFile, GitHubFile]


@dataclass(frozen=True)
class DataFile:
    """One file: its name under a data directory, where it comes from and how to check it.

    ``sha256`` and ``size`` are None only where no copy was at hand to measure; ``git_sha1`` (the git
    blob id, ``git hash-object``) then verifies it.  ``hash_source`` says where the hashes come from.
    """

    name: str
    source: Source
    size: int | None
    sha256: str | None
    git_sha1: str
    used_by: tuple[str, ...]
    records: str
    licence: str
    hash_source: str = "measured on the shared/data copy (PROVENANCE.md)"
    note: str = ""

    @property
    def embedded(self) -> bool:
        return self.name == EMBEDDED


def _knowedit(name: str, path: str, size: int | None, sha256: str | None, git_sha1: str, used_by: tuple[str, ...],
              records: str, **extra: str) -> DataFile:
    revision = extra.pop("revision", KNOWEDIT_REVISION)
    return DataFile(name, HubFile(KNOWEDIT_REPO, path, revision), size, sha256, git_sha1, used_by, records, "MIT",
                    **extra)


def _easyedit(name: str, path: str, size: int, sha256: str, git_sha1: str, used_by: tuple[str, ...],
              records: str) -> DataFile:
    return DataFile(name, GitHubFile(EASYEDIT_FORK, f"dataset/edit_data/{path}", EASYEDIT_FORK_COMMIT), size, sha256,
                    git_sha1, used_by, records, "MIT",
                    note="EasyEdit editing-data release; an unverified Hub mirror is HymanH/editing-data (data/...)")


MANIFEST: tuple[DataFile, ...] = (
    _easyedit(EMBEDDED, "portability/One Hop/zsre_mend_eval_portability_gpt4.json", 842_861,
              "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
              "4add57524f53b19cf24ef5de45bb679e622b47a0", ("zsre", STATS_CORPUS), "1,037"),
    _easyedit("counterfact/counterfact_portability_gpt4.json", "portability/One Hop/counterfact_portability_gpt4.json",
              2_725_930, "fac215b31d9481a33e055ac85145d1d711217dfd20ad3c45e61fc2d6b540c5ed",
              "d96e55796cf0b6608bec970d4cdcc8f7ff1eeb41", ("counterfact",), "1,031"),
    _easyedit("counterfact/counterfact-val.json", "counterfact/counterfact-val.json", 741_112,
              "4feb68cc1f85dcf3b285252a28f2b2193ff69971947619356236953be60ecd1f",
              "1110e62d2f7c5931202f96126019cc012019c783", ("counterfact",), "1,919"),
    _easyedit("counterfact/counterfact-train.json", "counterfact/counterfact-train.json", 3_849_872,
              "bb40e12c7b740d6859e521674cf438f063c7c3e444bc1b449e74cdd0900772d0",
              "baa0cc50500d844c36c50805641f21cbe1cfede6", (STATS_CORPUS,), "10,000"),
    _knowedit("knowedit/zsre_test_all.json", "benchmark/ZsRE/ZsRE-test-all.json", 1_523_064,
              "d70ff1f69ddcac101bbe9c6f1d6ee3918bdac96f145d937e90fbbb02fcf85fab",
              "85eb718b0b7d4a2f3ee0813df322320dc2c2e546", ("zsre-knowedit",), "1,304"),
    _knowedit("knowedit/wiki_recent_test.json", "benchmark/wiki_recent/recent_test.json", None, None,
              "ac8c33a5668444a2076c22da0e92c33e1c58b974", ("wikidata-recent",), "1,266",
              hash_source=("git blob id of dataset/KnowEdit-ms/benchmark_wiki_recent_recent_test.json in "
                           "github.com/leonz-z/EasyEdit@5d49c47 (the same blob in fasdkljfds/EasyEdit@e788065): "
                           "no copy was at hand here and the Hub's own id could not be read (no network), so the "
                           "file is verified by its git blob id, and its size and sha256 are printed when fetched"),
              note="the official WikiData_recent test split"),
    _knowedit("knowedit/wiki_recent_train.json", "benchmark/wiki_recent/recent_train.json", 1_837_416,
              "5856107412ddeeae2ceea2a15ebd125fd7c86ac8d62b933b095514304a77c73a",
              "b0b0070fa1ed2d6d154856d75cce9f1856e0d2e6", ("wikidata-recent",), "570"),
    _knowedit("knowedit/wiki_counterfact_test_cf.json", "benchmark/wiki_counterfact/test_cf.json", 7_568_799,
              "8773ca68b7e13ce4f0a45ef8a425ccf3eead3a227636de37b1caad01aff65df9",
              "d07dd94189ffb965b2fc1b8122ed8f8b7a388574", ("wikidata-counterfact",), "885",
              revision=KNOWEDIT_TEST_CF_REVISION,
              note=("pinned to 3ec93ed, which holds the 7.57 MB file (our size; the bytes are checked on fetch); "
                    "from 3ec51f9 on the Hub serves a 2.92 MB re-upload, whose hash no row reports; shared/data "
                    "stores it gzipped (.json.gz), and the hashes are of the decompressed content")),
    _knowedit("knowedit/wiki_counterfact_train_cf.json", "benchmark/wiki_counterfact/train_cf.json", 1_388_264,
              "acdc01922afab1d4122249a2c22ad8c1e0e86506dd7a28eec698f22d175ebf9d",
              "3040f03ab5cbe131b40456ee6b4de4d5237fd0da", ("wikidata-counterfact",), "1,428"),
    _knowedit("knowedit/wikibio_test_all.json", "benchmark/WikiBio/wikibio-test-all.json", 309_858,
              "00933f69b47d8281d01f1f4b84f3f266b7482a65a7d74022e660a8a9ca2264a4",
              "c4503c3ae7d09e8d88ab522162db7c9dc7145d68", ("wikibio",), "306",
              hash_source=("measured on the shared/data copy; a public download script expects the same sha256 "
                           "from the Hub")),
    _knowedit("knowedit/wikibio_train_all.json", "benchmark/WikiBio/wikibio-train-all.json", 454_217,
              "6ee88049c1c6c00d6f81d2d942350b6ec78b45917d2ec8a3eec3eafa89c2e209",
              "fd11768426fe24820d7b99e11acd4db7e2277721", ("wikibio", STATS_CORPUS), "464",
              hash_source=("measured on the shared/data copy; a public download script expects the same sha256 "
                           "from the Hub")),
    _knowedit("knowedit/convsent_blender_test.json", "benchmark/Convsent/blender_test.json", 1_327_531,
              "bfdab01a2655f5b136e593bc0d1d440cea963a1883510da7b31178855db00804",
              "cf80f02b519e2fd910c59b216aa8bc81a50d8b18", ("convsent",), "800"),
    _knowedit("knowedit/convsent_blender_val.json", "benchmark/Convsent/blender_val.json", 1_325_161,
              "4c21b2d802ac70877c9356439f676ead4bd9eb767c2f34d582df4b5b200e3882",
              "98b69a13f438a25ac5f0d56dfc6e4f0150d30836", ("convsent",), "799"),
    _knowedit("knowedit/sanitation_trivia_qa_train.json", "benchmark/trivia/trivia_qa_train.json", 87_025,
              "30ddde2c3410f93cf5a7f34fe6fcb0fd9f1d4fdfde3974c563c76c763ae109d3",
              "a377bf2206b746e4da285adb6cf9063f64f69421", ("zsre",), "K_F 80, K_R 453",
              note="zsre split 'all' trains BaFT's locality term on its K_R questions"),
    DataFile("piqa/valid.jsonl", GitHubFile(PIQA_REPO, "piqa/data/valid.jsonl", PIQA_COMMIT), 495_929,
             "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
             "da35972044f4a35e0053ff09a97ed7926ed3b8b4", ("piqa",), "1,838", "AFL-3.0"),
    DataFile("piqa/valid-labels.lst", GitHubFile(PIQA_REPO, "piqa/data/valid-labels.lst", PIQA_COMMIT), 3_676,
             "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
             "2cec30af5415a24647d70417db4df35c202c6c34", ("piqa",), "1,838", "AFL-3.0"),
)

_BY_NAME = {entry.name: entry for entry in MANIFEST}


def entry_for(name: str) -> DataFile | None:
    """The manifest entry of a data file name (a ``.gz`` name maps to the file it compresses)."""
    return _BY_NAME.get(name.removesuffix(".gz"))


def group_names() -> tuple[str, ...]:
    """What ``kebench data fetch --benchmark`` accepts: benchmarks, ``piqa`` and the statistics corpus."""
    return tuple(sorted({group for entry in MANIFEST for group in entry.used_by}))


def entries_for(group: str) -> tuple[DataFile, ...]:
    return tuple(entry for entry in MANIFEST if group in entry.used_by)


def fetch_command(name: str) -> str:
    """The command that fetches ``name`` (by the first group that reads it)."""
    entry = entry_for(name)
    if entry is None:
        return ""
    return f"kebench data fetch --benchmark {entry.used_by[0]}"

"""ConvSent's ES and DD are registered metrics, scored by the scenario runner under their own protocol
beside the teacher-forced proxy, and equal the one-shot ``convsent_scores`` of EasyEdit's definition."""

from __future__ import annotations

import pytest

from benchmarks.data import resolve_data_dir
from benchmarks.knowedit import PROTOCOL_CONVSENT, convsent_scores
from benchmarks.registry import get_benchmark, select_cases
from kebench.core.metrics import get_metric
from methods.hparams import load_hparams
from orchestrator.scenarios import Scenario, plain_logits, run_scenario


def test_es_and_dd_are_registered() -> None:
    assert get_metric("es").protocol == PROTOCOL_CONVSENT and get_metric("es").higher_is_better
    assert not get_metric("dd").higher_is_better and not get_metric("dd").in_average


@pytest.mark.needs_data("convsent")
@pytest.mark.parametrize("method", ["unedited", "reft"])
def test_scenario_reports_es_dd_beside_the_proxy(method: str, tiny_lm) -> None:
    bench = get_benchmark("convsent")
    cases = select_cases("convsent", "dev", n=2).cases
    scorer = bench.extra_scorer("dev", resolve_data_dir(None))
    result = run_scenario(tiny_lm, method, load_hparams(method, "tiny-random-llama", "single"), cases,
                          Scenario("single"), seed=0, metrics=bench.metrics, extra_scorer=scorer)
    by_protocol = {(c.case_id, c.scores.protocol): c.scores.as_dict() for c in result.cases}
    for case in cases:
        proxy = by_protocol[(case.case_id, "teacher_forced")]
        es_dd = by_protocol[(case.case_id, PROTOCOL_CONVSENT)]
        assert set(proxy) == {"rel"} and set(es_dd) == {"es", "dd"}
        if method == "unedited":
            base = plain_logits(tiny_lm)
            expected = convsent_scores(base, base, tiny_lm.tokenizer, tiny_lm.pad_token_id, tiny_lm.device,
                                       scorer.probes[case.case_id])
            assert es_dd["es"] == pytest.approx(expected.es) and es_dd["dd"] == pytest.approx(0.0, abs=1e-6)
        else:
            assert es_dd["dd"] > 0.0  # the edit moved the next topic's distributions

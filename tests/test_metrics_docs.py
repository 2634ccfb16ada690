"""docs/metrics.md is generated from the registry: it must be current and name every metric and rule."""

from pathlib import Path

from tdlm.metrics import docs
from tdlm.metrics.text import TEXT
from tdlm.metrics.text_health import TEXT_RULES, reference_page

PAGE = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


def test_reference_page_is_current():
    assert PAGE.read_text() == reference_page(), "docs/metrics.md is stale: run python -m tdlm.metrics.docs"


def test_page_names_every_metric_need_and_rule():
    page = reference_page()
    for spec in TEXT.specs():
        assert f"| `{spec.name}` | {spec.unit} |" in page, spec.name
    for need in TEXT.needs:
        assert f"| `{need}` |" in page
    for rule in TEXT_RULES:
        assert f"| `{rule.name}` |" in page


def test_check_mode_reports_stale(tmp_path, capsys):
    out = tmp_path / "m.md"
    assert docs.main(["--check", "tdlm.metrics.text_health:reference_page", str(out)]) == 1
    assert docs.main(["tdlm.metrics.text_health:reference_page", str(out)]) == 0
    assert docs.main(["--check", "tdlm.metrics.text_health:reference_page", str(out)]) == 0
    out.write_text(out.read_text() + "edit\n")
    assert docs.main(["--check", "tdlm.metrics.text_health:reference_page", str(out)]) == 1
    assert "stale" in capsys.readouterr().out

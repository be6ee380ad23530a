"""Untrusted text in artifact markdown shows as written: one table cell, no markup, no link,
no image, no heading, no raw HTML, whatever the text (a property over any string)."""

from __future__ import annotations

import html
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from markdown_it import MarkdownIt

from hailuo_batch import markdown as md
from hailuo_batch.apixo.models import provider_text
from hailuo_batch.inbox import report_markdown
from hailuo_batch.rerun import outcome_markdown, selection_markdown
from hailuo_batch.results import summary_markdown

# a permissive renderer: raw HTML allowed, as a careless viewer would
RENDER = MarkdownIt("commonmark", {"html": True}).enable("table").enable("strikethrough")
HOSTILE = [
    "EVIL` | 1 |\n\n# PWNED\n![track](http://evil.example/pixel.png)\n[click](javascript:alert(1))",
    "night|x ![p](http:evil.example).csv",
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "**bold** _it_ ~~gone~~ `code` \\`",
    "a\nb\r\nc\x00d\x1b[31me\u202ef",
    "https://example.com/a_b*c*",
    "&lt;b&gt; &amp;",
    "12345. items failed",
    "www.evil.example and a@evil.example",
    "- item\n1. item\n> quote\n---",
    "",
]
TEXT = st.text(st.characters(codec="utf-8"), max_size=80) | st.sampled_from(HOSTILE)


def shown(value: str) -> str:
    """What a person should read: the value on one line, acting characters as escapes."""
    return provider_text(" ".join(value.split()), md.MAX_SHOWN)


def cells(rendered: str) -> list[str]:
    """The text of each <td> of the rendered table, as a person reads it."""
    found = re.findall(r"<td>(.*?)</td>", rendered, flags=re.S)
    return [html.unescape(re.sub(r"</?code>", "", c)) for c in found]


@settings(max_examples=300, deadline=None)
@given(value=TEXT, how=st.sampled_from(["text", "code"]))
def test_any_text_in_a_table_cell_is_one_cell_of_that_text(value: str, how: str) -> None:
    cell = getattr(md, how)(value)
    rendered = RENDER.render(f"| a | b |\n|---|---|\n| {cell} | end |\n")
    assert cells(rendered) == [shown(value).strip(), "end"], rendered
    assert not re.search(r"<(?!/?(table|thead|tbody|tr|th|td|code)\b)", rendered), rendered


@settings(max_examples=200, deadline=None)
@given(value=TEXT)
def test_any_text_in_a_list_item_makes_no_markup(value: str) -> None:
    rendered = RENDER.render(f"- not rerun: {md.text(value)}\n")
    assert not re.search(r"<(?!/?(ul|li)\b)", rendered), rendered
    inner = re.sub(r"</?(ul|li)>", "", rendered).strip()
    assert html.unescape(inner) == f"not rerun: {shown(value)}".strip()


@pytest.mark.parametrize("value", HOSTILE)
def test_every_artifact_built_from_untrusted_text_keeps_its_shape(value: str) -> None:
    """The run summary (failCode from the provider, the results URL), the nightly report (the
    inbox's file names and errors) and the rerun's report (ids of a hand-edited results file,
    a run's message)."""
    summary = {
        "run_id": "r1", "items": 1, "by_status": {"failed": 1}, "by_fail_code": {value: 1},
        "cost_time_ms": {"min": None, "median": None, "p95": None, "max": None},
        "estimated_cost_usd": 0.0, "balance_before_usd": None, "balance_after_usd": None,
        "balance_spent_usd": None, "wall_time_s": 1.0, "stored_bytes": 0, "rerun_of": value,
    }  # fmt: skip
    nightly = {
        "inbox": value, "taken": [value], "done": [],
        "failed": [{"manifest": value, "error": value, "record": value}],
    }  # fmt: skip
    pages = [
        summary_markdown(summary, results_url=value),
        report_markdown(nightly),
        selection_markdown(value, 1, ["failed"], value, [value]),
        outcome_markdown("Failed", value, {"by_status": {"failed": 1}, "results": value}),
    ]
    for page in pages:
        rendered = RENDER.render(page)
        assert not re.search(r"<(img|a|script|h[3-6]|hr|blockquote|ol)\b", rendered), page
        assert rendered.count("<h1>") + rendered.count("<h2>") <= 1, page  # its own title
        for row in re.findall(r"<tr>(.*?)</tr>", rendered, flags=re.S):
            assert len(re.findall(r"<td\b", row)) in (0, 2, 4), page  # rows keep their columns


@pytest.mark.parametrize("value", ["www.evil.example", "a@evil.example", "see www.x.io/a"])
def test_text_that_a_gfm_renderer_would_autolink_is_escaped(value: str) -> None:
    """GFM turns bare www. addresses and e-mail addresses into links: each dot and @ is
    escaped, which stops it (the renderer here has no linkify to show it)."""
    out = md.text(value)
    assert "www." not in out and "@" not in out.replace("\\@", "")


def test_shaping_characters_of_real_text_are_kept() -> None:
    """Zero-width joiners and non-joiners shape emoji and Persian words; they do not act."""
    family, persian = "👨\u200d👩\u200d👧", "می\u200cخواهم"  # noqa: RUF001
    assert provider_text(f"{family} {persian}", 100) == f"{family} {persian}"


def test_a_name_from_outside_is_one_harmless_log_line() -> None:
    """Inbox file names and a hand-edited results file's ids reach run logs and terminals."""
    from hailuo_batch.apixo.models import shown

    name = "a\x1b]0;PWNED\x07\u202ex.csv" + "y" * 600
    line = shown(name)
    assert "\x1b" not in line and "\x07" not in line and "\u202e" not in line
    assert line.startswith("a\\x1b]0;PWNED\\x07\\u202ex.csv") and len(line) < 560


@pytest.mark.parametrize("how", ["text", "code"])
def test_a_long_value_is_cut_once_and_says_how_much_more_there_was(how: str) -> None:
    value = "`" + "x" * 999  # a backtick: code falls back to text
    assert getattr(md, how)(value).endswith(r"\.\.\. \(500 more characters\)")

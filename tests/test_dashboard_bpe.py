"""Token views on a byte-level BPE tokenizer: the Rollouts page draws the tokens the run stored
(`token_pieces`, run-format schema 2), not pieces guessed by counting characters.

(a) the alignment on hand-built rows: pieces join to the completion, stored spans box the right
tokens, a character split over two byte-level tokens, the new colour scales, the fallback for
old runs; (b) the page under AppTest on a real run of a random Qwen3 whose BPE tokenizer is
trained here (`poise_probe.bpe_model`); (c) the same page in headless Chromium.
"""
from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path

import dashboard_fixtures as fx
import numpy as np
import pandas as pd
import pytest

APPS = Path(__file__).resolve().parents[1] / "apps"
if str(APPS) not in sys.path:
    sys.path.insert(0, str(APPS))

from poise_dash import analysis, token_view, tokens  # noqa: E402


class TokenSpans(HTMLParser):
    """The tokens of `render_html`'s output: per token its text, tooltip and the span boxes
    (think, answer) it sits in, outermost first."""

    def __init__(self, markup: str):
        super().__init__(convert_charrefs=True)
        self.tokens: dict[int, dict] = {}
        self._open: list[tuple[str, str | None, int | None]] = []  # (tag, box kind, token)
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        tok = int(a["data-tok"]) if "data-tok" in a else None
        if tok is not None:
            boxes = [kind for _, kind, _ in self._open if kind]
            self.tokens[tok] = {"text": "", "title": a.get("title", ""), "boxes": boxes,
                                "style": a.get("style", "")}
        if tag != "br":
            self._open.append((tag, a.get("data-span"), tok))

    def handle_endtag(self, tag):
        self._open.pop()

    def handle_data(self, data):
        for _, _, tok in reversed(self._open):
            if tok is not None:
                self.tokens[tok]["text"] += data
                return

    def boxed(self, kind: str) -> list[int]:
        return sorted(i for i, t in self.tokens.items() if kind in t["boxes"])


# --------------------------------------------------------------------------------------------
# (a) the alignment on hand-built rows

#: "<think>3 × 4 → 12; café</think><answer>12</answer>" as a byte-level BPE tokenizer splits
#: it: " ×" one token; "é" (bytes c3 a9) split over two tokens, the first with no text; EOS.
PIECES = ["<think>", "3", " ×", " 4", " →", " 12", ";", " caf", "", "é", "</think>",
          "<answer>", "12", "</answer>", ""]
N = len(PIECES)
SPANS = {"reasoning_span": [1, 10], "answer_span": [12, 13], "pooled_span": [4, 11]}


def bpe_row(**overrides) -> dict:
    row = {"completion": "".join(PIECES), "token_pieces": PIECES,
           "token_ids": list(range(500, 500 + N)), "token_entropies": np.linspace(0, 2, N),
           "token_logprobs": -np.linspace(0.1, 3, N).astype(np.float32), **SPANS}
    row.update(overrides)
    return row


def test_stored_pieces_are_the_tokens_exactly():
    row = bpe_row()
    al = tokens.align_row(row)
    assert al.mode == "pieces" and al.coloured and al.pieces == PIECES
    assert "".join(al.pieces) == row["completion"]
    assert "stored" in al.describe() and "2 without text" in al.describe()
    shown = TokenSpans(token_view.render_html(al, 1.0))
    assert sorted(shown.tokens) == list(range(N))                    # one span per token
    assert shown.tokens[2]["text"] == " ×" and shown.tokens[7]["text"] == " caf"
    assert "'␣×'" in shown.tokens[2]["title"] and "id 502" in shown.tokens[2]["title"]
    assert shown.tokens[0]["text"] == "<think>"                     # escaped, shown as text
    assert shown.tokens[N - 1]["text"] == "end"                       # EOS: no text, a marker


def test_stored_spans_box_the_tokens_the_trainer_used():
    al = tokens.align_row(bpe_row())
    assert al.spans_stored
    assert al.spans == [("think", 1, 9), ("answer", 12, 12)]         # [lo, hi) -> last = hi - 1
    assert al.pooled == (4, 11)
    assert ("probe window", 4, 10) in al.strip_spans()
    shown = TokenSpans(token_view.render_html(al, 1.0))
    assert shown.boxed("think") == list(range(1, 10))                # tags outside: as stored
    assert shown.boxed("answer") == [12]
    underlined = sorted(i for i, t in shown.tokens.items() if "inset 0 -2px" in t["style"])
    assert underlined == list(range(4, 11))
    # an empty span draws nothing; a span that does not fit the tokens is named, not drawn
    al = tokens.align_row(bpe_row(answer_span=[0, 0], reasoning_span=[3, 99]))
    assert al.spans == [] and "does not fit 15 tokens" in al.describe()
    assert "data-span" not in token_view.render_html(al, 1.0)


def test_a_character_split_over_two_byte_tokens_belongs_to_the_second():
    al = tokens.align_row(bpe_row())
    shown = TokenSpans(token_view.render_html(al, 1.0))
    first, second = shown.tokens[8], shown.tokens[9]
    assert al.pieces[8:10] == ["", "é"]
    assert first["text"] == "·" and "no text of its own" in first["title"]
    assert "first bytes of a character" in first["title"] and "id 508" in first["title"]
    assert second["text"] == "é" and "'é'" in second["title"]
    # the real tokenizer splits a character it has no merge for over its UTF-8 bytes
    from poise_probe.bpe_model import build_bpe_tokenizer

    tok = build_bpe_tokenizer(300)
    ids = tok("ǅ", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2 and tok.decode(ids[:1]) == "\ufffd" and tok.decode(ids) == "ǅ"


def test_whitespace_is_visible_and_markup_escaped_in_tooltips():
    assert token_view.visible_piece(" the") == "'␣the'"
    assert token_view.visible_piece("\n\t") == "'⏎⇥'" and token_view.visible_piece("") == "''"
    assert token_view.visible_piece("\x07") == "'\\x07'"
    pieces = ["<b>", " x", "\n"]
    al = tokens.align("<b> x\n", np.ones(3), token_pieces=pieces)
    markup = token_view.render_html(al, 1.0)
    assert "<b>" not in markup and "&lt;b&gt;" in markup
    shown = TokenSpans(markup)
    assert shown.tokens[0]["text"] == "<b>" and "'␣x'" in shown.tokens[1]["title"]
    assert "'⏎'" in shown.tokens[2]["title"]


def test_engine_log_probs_and_token_advantages_colour_and_tooltips():
    eng = -np.linspace(0.1, 3, N) + 0.01 * (np.arange(N) % 3)
    adv = np.linspace(-1, 1, N)
    al = tokens.align_row(bpe_row(engine_logprobs=eng.astype(np.float32),
                                  token_advantages=adv.astype(np.float32)))
    np.testing.assert_allclose(token_view.get_scale("engine_logprob").values(al), eng, rtol=1e-6)
    np.testing.assert_allclose(token_view.get_scale("logprob_gap").values(al),
                               0.01 * (np.arange(N) % 3), atol=1e-6)
    np.testing.assert_allclose(token_view.get_scale("advantage").values(al), adv, rtol=1e-6)
    assert [s.key for s in token_view.available_scales(True, True, True)] == [
        "entropy", "logprob", "prob", "engine_logprob", "logprob_gap", "advantage"]
    assert [s.key for s in token_view.available_scales(True, False, True)] == [
        "entropy", "logprob", "prob", "advantage"]
    assert [s.key for s in token_view.available_scales(False, True, False)] == [
        "entropy", "engine_logprob"]                # the gap needs both
    shown = TokenSpans(token_view.render_html(al, 1.0, scale="advantage"))
    t = shown.tokens[N - 1]["title"]
    assert f"engine log p={eng[-1]:.3f}" in t and f"A={adv[-1]:.4f}" in t and "|Δ|=" in t
    # diverging: red below zero, green above, white at zero, symmetric intensity
    sc = token_view.SCALES["advantage"]
    red, green = sc.colour(-1.0, 1.0), sc.colour(1.0, 1.0)
    assert red.startswith("rgba(215,45,35") and green.startswith("rgba(30,150,60")
    assert red.rsplit(",", 1)[1] == green.rsplit(",", 1)[1] == "0.90)"
    assert sc.colour(0.0, 1.0).endswith("0.08)") and sc.colour(float("nan"), 1.0) == \
        token_view.MISSING_COLOUR
    assert sc.legend_values(2.0) == [-2.0, -1.0, 0.0, 1.0, 2.0]
    assert sc.y_range(adv, 0.5) == pytest.approx([-1.1, 1.1])
    assert token_view.SCALES["logprob_gap"].colour(0.0, 0.1).endswith("0.08)")
    assert "|engine − trainer|" in token_view.legend_html(0.1, "logprob_gap")
    # a row whose engine log-probs are null (stored as null when the engine had none)
    al = tokens.align_row(bpe_row(engine_logprobs=None, token_advantages=None))
    assert al.engine_log_probs is None
    assert np.isnan(token_view.get_scale("logprob_gap").values(al)).all()
    assert "engine log p" not in token_view.render_html(al, 1.0) and "A=" not in \
        token_view.render_html(al, 1.0)


def test_old_rows_fall_back_to_counting_characters():
    """Schema 1: no pieces, no span columns: today's modes, spans found from the text."""
    text = "<think>1+2</think><answer>3</answer>"
    pieces = tokens.split_pieces(text)
    row = {"completion": text, "token_entropies": np.ones(len(pieces) + 1)}
    al = tokens.align_row(row)
    assert al.mode == "chars+tags" and not al.spans_stored
    assert al.spans == [("think", 0, 4), ("answer", 5, 7)]           # tags included
    # stored spans without pieces (a char tokenizer in a schema-2 run) replace the found ones
    al = tokens.align_row({**row, "reasoning_span": [1, 4], "answer_span": [6, 7],
                           "pooled_span": [0, 5]})
    assert al.mode == "chars+tags" and al.spans == [("think", 1, 3), ("answer", 6, 6)]
    # pieces that do not join to the completion are refused, saying so
    al = tokens.align_row(bpe_row(token_pieces=PIECES[:-2] + ["x", ""]))
    assert al.mode == "token_ids" and "do not join to the completion" in al.describe()
    # a row the trainer stored no pieces for: the ids, and the caption says why
    al = tokens.align_row(bpe_row(token_pieces=None))
    assert al.mode == "token_ids" and "stored no token pieces" in al.describe()
    assert al.spans == [("think", 1, 9), ("answer", 12, 12)]        # still the stored spans


def test_probe_targets_prefer_the_stored_column():
    from poise_probe.probe import loo_targets

    df = pd.DataFrame({"step": [1, 1, 1, 2, 2], "group_id": [0, 0, 0, 0, 0],
                       "score": [0.0, 0.5, 1.0, 1.0, 0.0], "reward": [0.0, 0.5, 1.0, 1.0, 0.0]})
    recomputed, source = analysis.probe_targets(df)
    assert source == "recomputed"
    np.testing.assert_allclose(recomputed[:3], loo_targets([0, .5, 1], [0, 0, 0]))  # one home
    np.testing.assert_allclose(recomputed, [.75, .5, .25, 0.0, 1.0])
    stored = df.assign(probe_target=[0.1, 0.2, 0.3, np.nan, np.nan])   # step 2: no column
    values, source = analysis.probe_targets(stored)
    assert source == "stored and recomputed"
    np.testing.assert_allclose(values, [0.1, 0.2, 0.3, 0.0, 1.0])
    values, source = analysis.probe_targets(stored[stored["step"] == 1])
    assert source == "stored" and values.tolist() == [0.1, 0.2, 0.3]
    lone = pd.DataFrame({"step": [1], "group_id": [0], "score": [1.0]})
    assert analysis.probe_targets(lone)[0].isna().all()                # undefined, not 0


def test_bpe_model_command_builds_a_model_the_trainer_accepts(tmp_path, capsys):
    from poise_probe.bpe_model import build_bpe_tokenizer, main
    from poise_probe.features import TagIds
    from poise_probe.models import load_policy

    assert main(["--out", str(tmp_path / "m"), "--vocab-size", "300", "--hidden-size", "16",
                 "--layers", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")
    model, tok = load_policy(tmp_path / "m")
    assert type(model).__name__ == "Qwen3ForCausalLM" and len(tok) == 300
    assert model.config.vocab_size == 300 and model.config.eos_token_id == tok.eos_token_id
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    tags = TagIds.from_tokenizer(tok)
    assert None not in (tags.think_open, tags.think_close, tags.answer_open, tags.answer_close)
    text = "<think>Compute 3 × 4 → 12; café</think><answer>12</answer>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text  # EOS skipped
    assert any(len(tok.decode([i])) > 1 and tok.decode([i]) not in tokens.TAGS for i in ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="vocab_size must be >= 264"):
        build_bpe_tokenizer(100)


# --------------------------------------------------------------------------------------------
# (b), (c) a real run of a random Qwen3 with a byte-level BPE tokenizer


@pytest.fixture(scope="session")
def bpe_run(tmp_path_factory):
    """A 2-step POISE run on `build_bpe_model`'s random Qwen3; long enough completions that the
    sampled tokens include think/answer tags (a random model samples them rarely)."""
    from poise_probe.bpe_model import build_bpe_model

    root = tmp_path_factory.mktemp("bpe")
    model = build_bpe_model(root / "model", vocab_size=300, hidden_size=32)
    return fx.train_run(root / "runs" / "bpe", model, 2,
                        **{"rollout.prompts_per_step": 8, "rollout.max_completion_length": 64,
                           "optim.mini_batch_prompts": 8, "optim.micro_batch_size": 16})


def rows_with_pieces(run: Path) -> pd.DataFrame:
    """Every stored rollout whose pieces were recorded, with the step, as the page reads them."""
    from poise_probe.rundir import RunReader

    table = RunReader(run).all_rollouts()
    assert "token_pieces" in table, "the trainer writes run-format schema 2 (token_pieces)"
    return table[table["token_pieces"].map(lambda p: p is not None)]


def pick_group(run: Path) -> tuple[int, int, pd.DataFrame]:
    """(step, group, its rows) of a prompt one of whose rollouts has a non-empty answer span
    and a multi-character piece."""
    table = rows_with_pieces(run)
    ok = table[table["answer_span"].map(lambda s: s[1] > s[0])
               & table["token_pieces"].map(lambda p: any(len(x) > 1 and x not in tokens.TAGS
                                                         for x in p))]
    assert len(ok), "no rollout of the fixture run has an answer span and a multi-char piece"
    step, gid = int(ok["step"].iloc[0]), int(ok["group_id"].iloc[0])
    return step, gid, ok[(ok["step"] == step) & (ok["group_id"] == gid)]


@pytest.mark.slow
def test_the_trainer_stores_pieces_that_join_to_each_completion(bpe_run):
    from poise_probe.rundir import RunReader

    table = RunReader(bpe_run).all_rollouts()
    assert RunReader(bpe_run).meta["rollout_engine"] in ("hf", "vllm")
    stored = rows_with_pieces(bpe_run)
    assert len(stored) >= len(table) // 2
    for _, r in stored.iterrows():
        assert len(r["token_pieces"]) == len(r["token_ids"]) == r["num_tokens"]
        assert "".join(r["token_pieces"]) == r["completion"]
    multi = sum(len(p) > 1 and p not in tokens.TAGS for ps in stored["token_pieces"] for p in ps)
    assert multi > 0                                       # BPE: pieces are not characters


@pytest.mark.slow
def test_rollouts_page_shows_the_stored_bpe_pieces(bpe_run, monkeypatch):
    step, gid, rows = pick_group(bpe_run)
    at = fx.open_app(monkeypatch, bpe_run, page="rollouts",
                     query={"focus": "bpe", "steps": f"{step}-{step}", "group": f"{step}:{gid}"})
    assert at.selectbox(key="ro_group").value == (step, gid)
    markup = "\n".join(str(h.proto.body) for h in at.html)
    captions = " ".join(c.value for c in at.caption)
    assert "text pieces the run stored" in captions
    for _, r in rows.iterrows():
        al = tokens.align_row(r)
        assert al.mode == "pieces"
        shown = TokenSpans(token_view.render_html(al, 1.0))
        for i, piece in enumerate(r["token_pieces"]):
            if piece and piece not in tokens.TAGS and "\n" not in piece and "\t" not in piece:
                assert shown.tokens[i]["text"] == piece
        multi = next(p for p in r["token_pieces"] if len(p) > 1 and p not in tokens.TAGS)
        import html as html_

        assert f"{html_.escape(token_view.visible_piece(multi), quote=True)} · id " in markup
        lo, hi = r["answer_span"]
        assert shown.boxed("answer") == list(range(lo, hi))
    assert ">think</sup>" in markup and ">answer</sup>" in markup
    # the colour scales this run can offer; the HF engine's log-probs
    options = at.segmented_control(key="ro_colour").options
    assert "engine log-prob (nats)" in options and "|engine − trainer| log-prob (nats)" in options
    at.segmented_control(key="ro_colour").set_value("logprob_gap").run()
    fx.assert_ok(at)
    assert "|engine − trainer| log-prob per token" in " ".join(fx.chart_titles(at))
    # the probe page compares with the stored target
    at.switch_page("views/probe.py").run()
    at.segmented_control(key="pr_against").set_value("target").run()
    fx.assert_ok(at)
    assert "(stored)" in " ".join(c.value for c in at.caption)
    assert at.query_params.get("against") in ("target", ["target"])


@pytest.mark.slow
@pytest.mark.skipif(fx.chromium_path() is None,
                    reason="chromium is not installed (apt-get install chromium); CI installs it")
def test_rollouts_page_in_chromium_draws_one_span_per_bpe_token(bpe_run, tmp_path):
    step, gid, rows = pick_group(bpe_run)
    want = {p for ps in rows["token_pieces"] for p in ps if len(p) > 1 and p not in tokens.TAGS
            and p.strip() == p and "\ufffd" not in p}
    query = f"/rollouts?focus=bpe&steps={step}-{step}&group={step}:{gid}"
    with fx.StreamlitServer([bpe_run]) as server, fx.open_page() as page:
        page.goto(server.url + query)
        state = fx.wait_rendered(page, min_charts=1, timeout=90)
        assert state["exceptions"] == 0, (state["exceptionText"], server.log.read_text()[-3000:])
        toks = page.locator("[data-tok]")
        toks.first.wait_for(state="attached")
        found = {"texts": toks.all_inner_texts(),
                 "think": page.locator("[data-span=think] [data-tok]").count(),
                 "answer": page.locator("[data-span=answer] [data-tok]").count(),
                 "labels": page.locator("[data-span] > sup").all_inner_texts()}
        fx.screenshot(page, tmp_path / "rollouts-bpe.png", full_height=min(state["height"], 6000))
    assert set(found["texts"]) & want, (want, found["texts"][:40])   # a BPE piece, one span
    assert found["think"] > 0 and found["answer"] > 0
    assert {"think", "answer"} <= set(found["labels"])
    total = int(rows["num_tokens"].sum())
    assert len(found["texts"]) >= total                  # every token of those rollouts drawn


@pytest.mark.slow
def test_a_schema_1_copy_of_the_bpe_run_falls_back_to_ids_and_recomputed_targets(
        bpe_run, tmp_path, monkeypatch):
    """The same run as an older trainer wrote it (no pieces, spans, targets, engine log-probs):
    the ids are shown as chips, the values as before, the probe target is recomputed."""
    import pyarrow.parquet as pq

    old = fx.copy_run(bpe_run, tmp_path / "old")
    newer = {"token_pieces", "reasoning_span", "answer_span", "pooled_span", "probe_target",
             "engine_logprobs", "token_advantages"}
    for path in (old / "rollouts").glob("step_*.parquet"):
        table = pq.read_table(path)
        table = table.drop_columns([c for c in table.column_names if c in newer])
        pq.write_table(table.replace_schema_metadata({"poise_probe.schema_version": "1"}), path)
    meta = json.loads((old / "meta.json").read_text())
    meta.pop("rollout_engine", None)
    (old / "meta.json").write_text(json.dumps({**meta, "schema_version": 1}))
    at = fx.open_app(monkeypatch, old, page="rollouts")
    options = at.segmented_control(key="ro_colour").options
    assert options == ["entropy (nats)", "log-prob (nats)", "probability"]
    captions = " ".join(c.value for c in at.caption)
    assert "shown by id" in captions and "text pieces" not in captions
    assert "data-span" not in "\n".join(str(h.proto.body) for h in at.html)   # no tags known
    at.switch_page("views/probe.py").run()
    at.segmented_control(key="pr_against").set_value("target").run()
    fx.assert_ok(at)
    assert "(recomputed)" in " ".join(c.value for c in at.caption)

"""Response files: three formats to one form, and errors that name file, line and column."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ppl_vae.data.irt import ResponseDataError, from_arrays, load_responses, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore:.*answered all their items")

LSAT6 = Path(__file__).resolve().parents[2] / "shared" / "data" / "irt" / "lsat6.csv"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


WIDE = "student,q1,q2,q3\nann,1,0,\nbob,,1,1\ncid,0,0,1\n"
LONG = ("student,item,response\nann,q1,1\nann,q2,0\nbob,q2,1\nbob,q3,1\n"
        "cid,q1,0\ncid,q2,0\ncid,q3,1\n")


def test_wide_long_and_jsonl_give_the_same_table(tmp_path):
    wide = load_responses(write(tmp_path / "w.csv", WIDE))
    long = load_responses(write(tmp_path / "l.csv", LONG))
    lines = [{"subject_id": "ann", "responses": {"q1": 1, "q2": 0}},
             {"subject_id": "bob", "responses": {"q2": 1, "q3": 1}},
             {"subject_id": "cid", "responses": {"q1": 0, "q2": 0, "q3": 1}}]
    jsonl = load_responses(write(tmp_path / "j.jsonl",
                                 "\n".join(json.dumps(r) for r in lines) + "\n"))
    for data in (long, jsonl):
        assert data.student_ids == ["ann", "bob", "cid"]
        assert data.item_ids == ["q1", "q2", "q3"]
        assert torch.equal(data.mask, wide.mask)
        assert torch.equal(data.responses, wide.responses)
    assert wide.mask.tolist() == [[True, True, False], [False, True, True], [True, True, True]]
    assert wide.responses[wide.mask].tolist() == [1, 0, 1, 1, 0, 0, 1]
    # missing cells are stored as 0 and masked, not imputed
    assert wide.responses[0, 2] == 0 and not wide.mask[0, 2]


def test_jsonl_round_trip(tmp_path):
    wide = load_responses(write(tmp_path / "w.csv", WIDE))
    write_jsonl(wide, tmp_path / "out.jsonl")
    back = load_responses(tmp_path / "out.jsonl")
    assert torch.equal(back.mask, wide.mask) and torch.equal(back.responses, wide.responses)


def test_lsat6_reads_with_ids_and_proportions():
    data = load_responses("lsat6")  # bundled with the package
    if LSAT6.exists():
        assert torch.equal(load_responses(LSAT6).responses, data.responses)
    assert (data.num_students, data.num_items) == (1000, 5)
    assert data.student_ids[0] == "s0001"
    p = data.responses.mean(0)
    assert torch.allclose(p, torch.tensor([.924, .709, .553, .763, .870]), atol=1e-3)


def test_bundled_lsat7_and_graded_codes(tmp_path):
    data = load_responses("lsat7")
    assert (data.num_students, data.num_items) == (1000, 5)
    graded = load_responses(write(tmp_path / "g.csv", "student,q1,q2\nann,3,0\nbob,,2\n"),
                            graded=True)
    assert graded.responses.tolist() == [[3.0, 0.0], [0.0, 2.0]]
    assert graded.mask.tolist() == [[True, True], [False, True]]
    with pytest.raises(ResponseDataError, match=r"line 3, column 'q2': value 'x' is not a "
                                                r"category code"):
        load_responses(write(tmp_path / "b.csv", "student,q1,q2\nann,3,0\nbob,1,x\n"),
                       graded=True)
    with pytest.raises(FileNotFoundError, match="bundled: lsat6, lsat7"):
        load_responses(tmp_path / "nothing.csv")


@pytest.mark.parametrize("text, expected", [
    ("student,q1,q2\nann,1,2\nbob,0,1\n", r"w\.csv: line 2, column 'q2': value '2'"),
    ("student,q1,q2\nann,1,0\nann,0,1\n", r"line 3, column 'student': duplicate student 'ann' "
                                          r"\(first on line 2\)"),
    ("student,q1,q2\nann,1,\nbob,0,\n", r"column 'q2': item has no responses"),
    ("student,q1,q2\nann,1,0\nbob,,\n", r"line 3 \(student 'bob'\) has no responses"),
    ("student,q1,q1\nann,1,0\n", r"line 1: duplicate item column 'q1'"),
    ("student;q1;q2\nann;1;0\n", r"line 1: one column, 'student;q1;q2': the file looks "
                                  r"separated by ';'; response tables are comma-separated"),
])
def test_wide_errors_name_line_and_column(tmp_path, text, expected):
    with pytest.raises(ResponseDataError, match=expected):
        load_responses(write(tmp_path / "w.csv", text))


def test_long_and_jsonl_errors(tmp_path):
    with pytest.raises(ResponseDataError, match=r"line 3: duplicate response of student 'a' "
                                                r"to item 'q1' \(first on line 2\)"):
        load_responses(write(tmp_path / "l.csv", "student,item,response\na,q1,1\na,q1,0\n"))
    with pytest.raises(ResponseDataError, match=r"line 2, column 'response': value 'yes'"):
        load_responses(write(tmp_path / "l.csv", "student,item,response\na,q1,yes\n"))
    with pytest.raises(ResponseDataError, match=r"line 2, field 'responses.q1': value 3"):
        load_responses(write(tmp_path / "j.jsonl", '{"subject_id": "a", "responses": {"q1": 1}}'
                             '\n{"subject_id": "b", "responses": {"q1": 3}}\n'))
    with pytest.raises(ResponseDataError, match=r"line 2, field 'subject_id': duplicate"):
        load_responses(write(tmp_path / "j.jsonl", '{"subject_id": "a", "responses": {"q1": 1}}'
                             '\n{"subject_id": "a", "responses": {"q1": 0}}\n'))


@pytest.mark.filterwarnings("default")
def test_warns_on_all_right_students(tmp_path):
    with pytest.warns(UserWarning, match=r"1 students answered all their items right or all "
                                         r"wrong \(first: line 2 \(student 'ann'\)"):
        load_responses(write(tmp_path / "w.csv", "student,q1,q2\nann,1,1\nbob,0,1\n"))


def test_align_to_training_items(tmp_path):
    new = load_responses(write(tmp_path / "n.csv", "id,q3,q1\nzed,1,0\n"), check=False)
    aligned = new.align(["q1", "q2", "q3"])
    assert aligned.mask.tolist() == [[True, False, True]]
    assert aligned.responses.tolist() == [[0.0, 0.0, 1.0]]
    with pytest.raises(ResponseDataError, match=r"items \['q9'\] were not in the training"):
        load_responses(write(tmp_path / "m.csv", "id,q9\nzed,1\n"), check=False).align(["q1"])


def test_from_arrays_nan_is_missing():
    data = from_arrays([[1.0, float("nan")], [0.0, 1.0]])
    assert data.mask.tolist() == [[True, False], [True, True]]
    with pytest.raises(ResponseDataError, match="row 1, column 0: value 0.5"):
        from_arrays([[1.0, 0.0], [0.5, 1.0]])


def test_a_run_keeps_its_own_answers_for_resume_and_evaluate(tmp_path):
    """Training writes responses.pt before the first step; resume, run.data() and evaluate
    read it, so editing (or deleting) the original file afterwards changes nothing."""
    import ppl_vae
    from ppl_vae.models.irt import simulate

    d = simulate(120, 6, "2pl", missing=0.1, seed=3)
    rows = ["student," + ",".join(f"q{j}" for j in range(6))]
    for s in range(120):
        cells = [str(int(d["responses"][s, j])) if d["mask"][s, j] else "" for j in range(6)]
        rows.append(f"s{s}," + ",".join(cells))
    exam = write(tmp_path / "exam.csv", "\n".join(rows) + "\n")
    out = tmp_path / "run"
    run = ppl_vae.train("irt-2pl", out, {"responses": str(exam)}, epochs=2, progress=False)
    assert (out / "responses.pt").exists()
    before = run.family.evaluate(ppl_vae.load_run(out))["log_likelihood"]
    exam.write_text("student,q0,q1,q2,q3,q4,q5\nz,1,1,1,1,1,1\n")  # the file changes
    loaded = ppl_vae.load_run(out)
    y, mask = loaded.data()
    assert y.shape == (120, 6) and torch.equal(mask, d["mask"])
    assert loaded.family.evaluate(loaded)["log_likelihood"] == pytest.approx(before)
    exam.unlink()
    again = ppl_vae.train("irt-2pl", out, resume=True, epochs=3, progress=False)
    assert len(again.history) == 3 and again.data()[0].shape == (120, 6)


def test_bundled_name_beside_a_folder_of_that_name(tmp_path, monkeypatch):
    """``--responses lsat6 --out lsat6``: the run folder is not the response file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lsat6").mkdir()
    table = load_responses("lsat6")
    assert table.num_students == 1000 and table.num_items == 5


def test_write_jsonl_takes_write_wides_arguments(tmp_path):
    """write_jsonl(path, responses, mask) as write_wide; the older (data, path) still works."""
    from ppl_vae.data.irt import write_wide

    responses = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [False, True, True]])
    wide = load_responses(write_wide(tmp_path / "w.csv", responses, mask))
    lines = load_responses(write_jsonl(tmp_path / "a.jsonl", responses, mask))
    assert torch.equal(lines.mask, wide.mask) and torch.equal(lines.responses, wide.responses)
    assert lines.student_ids == wide.student_ids and lines.item_ids == wide.item_ids
    write_jsonl(wide, tmp_path / "b.jsonl")  # the older argument order
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text()


def test_check_of_a_marginal_run_writes_ppc_csv(tmp_path, recwarn):
    """`ppl-vae check` of a marginal exam run wrote ppc.png without ppc.csv (its likelihood
    is a pyro.factor: no replicated answers; ArviZ warned about a constant variable, later
    failed): replicates from each item draw give the amortized runs' two checks."""
    import csv

    from ppl_vae.cli.main import main

    run = tmp_path / "run"
    main(["train", "irt-2pl", "--responses", "lsat6", "--epochs", "5", "--out", str(run),
          "--no-progress"])
    main(["check", str(run), "--samples", "20", "--khat-samples", "20",
          "--sbc-simulations", "0"])
    rows = list(csv.DictReader(open(run / "ppc.csv")))
    assert len(rows) == 5 + 6 and (run / "ppc.png").exists()  # 5 items, total scores 0..5
    observed = {r["statistic"]: float(r["observed"]) for r in rows
                if r["check"] == "proportion correct per item"}
    assert observed["item1"] == pytest.approx(0.924)  # LSAT6's share right on item 1
    assert all(0.0 <= float(r["p_value"]) <= 1.0 and float(r["lo"]) <= float(r["hi"])
               for r in rows)
    assert not [w for w in recwarn if "single value" in str(w.message)]


def test_long_tables_with_more_columns_or_an_answer_column_are_read_as_long(tmp_path):
    """A long table with a time stamp column, or a response column named 'answer', was read
    as wide ('duplicate student'); a long table the header does not give away is hinted."""
    body = "".join(f"s{s},q{j},{(s + j) % 2},12\n" for s in range(3) for j in range(2))
    extra = load_responses(write(tmp_path / "t.csv", "student,item,response,seconds\n" + body))
    assert (extra.num_students, extra.num_items) == (3, 2)
    assert extra.responses.tolist() == [[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    answer = load_responses(write(tmp_path / "a.csv", "student,item,answer\n" + "".join(
        r[:r.rindex(",")] + "\n" for r in body.splitlines())))
    assert torch.equal(answer.responses, extra.responses)
    with pytest.raises(ResponseDataError, match=r"duplicate student 's0' \(first on line 2\); "
                       r"if the file is a long table .*--format long.*item/item_id"):
        load_responses(write(tmp_path / "q.csv", "student,question,response\n" + "".join(
            r[:r.rindex(",")] + "\n" for r in body.splitlines())))


def test_graded_jsonl_codes_written_as_floats_are_codes(tmp_path):
    lines = [{"subject_id": f"s{i}", "responses": {"a": float(i % 3), "b": 2}} for i in range(3)]
    data = load_responses(write(tmp_path / "g.jsonl", "".join(json.dumps(r) + "\n"
                                                              for r in lines)), graded=True)
    assert data.responses.tolist() == [[0.0, 2.0], [1.0, 2.0], [2.0, 2.0]]
    with pytest.raises(ResponseDataError, match=r"line 1, field 'responses.a': value 2.5 is not "
                                                r"a category code"):
        load_responses(write(tmp_path / "h.jsonl", '{"subject_id": "s", "responses": '
                             '{"a": 2.5}}\n'), graded=True)


def test_an_unrecognised_id_column_is_hinted_at(tmp_path):
    text = "StudentID,q1,q2\ns0000,1,0\ns0001,0,1\n"
    with pytest.raises(ResponseDataError, match=r"line 2, column 'StudentID': value 's0000' is "
                       r"not 0, 1 or blank; if column 'StudentID' holds the students' ids, give "
                       r"--id-column StudentID"):
        load_responses(write(tmp_path / "w.csv", text))
    assert load_responses(tmp_path / "w.csv", id_column="StudentID").student_ids == \
        ["s0000", "s0001"]
    with pytest.raises(ResponseDataError, match=r"value '2' is not 0, 1 or blank$"):
        load_responses(write(tmp_path / "n.csv", "q0,q1,q2\n1,1,0\n2,0,1\n"))


def test_the_run_copy_keeps_codes_above_254_and_old_copies_still_load(tmp_path):
    """responses.pt was uint8 with 255 = missing: code 255 read back as missing, 256 as 0.
    Codes that fit stay uint8 (old runs reload); larger ones are stored wider."""
    from types import SimpleNamespace

    from ppl_vae.models.irt_tables import run_responses, save_responses

    run = SimpleNamespace(path=tmp_path, spec=None)
    big = load_responses(write(tmp_path / "b.csv", "student,i1,i2\na,255,256\nb,,999\n"),
                         graded=True)
    save_responses(big, tmp_path / "responses.pt")
    back = run_responses(run)
    assert back.responses.tolist() == [[255.0, 256.0], [0.0, 999.0]]
    assert back.mask.tolist() == [[True, True], [False, True]]
    small = load_responses(write(tmp_path / "s.csv", "student,i1,i2\na,254,1\nb,,0\n"),
                           graded=True)
    save_responses(small, tmp_path / "responses.pt")
    assert torch.load(tmp_path / "responses.pt")["codes"].dtype == torch.uint8
    torch.save({"codes": torch.tensor([[1, 255], [0, 3]], dtype=torch.uint8),  # an old run
                "student_ids": ["a", "b"], "item_ids": ["i1", "i2"]}, tmp_path / "responses.pt")
    old = run_responses(run)
    assert old.responses.tolist() == [[1.0, 0.0], [0.0, 3.0]]
    assert old.mask.tolist() == [[True, False], [True, True]]


@pytest.mark.filterwarnings("default")
def test_binary_items_everybody_got_right_or_wrong_are_named(tmp_path):
    """irt-2pl / irt-1pl trained such an item silently (MML difficulty -> -inf, a mean 4e7)."""
    from ppl_vae.models.irt import IRTFamily

    exam = write(tmp_path / "e.csv", "student,q1,easy,hard\na,1,1,0\nb,0,1,0\nc,1,1,\n")
    for model in ("irt-2pl", "irt-1pl", "irt-3pl"):
        with pytest.warns(UserWarning, match=r"e\.csv: every student gave the same answer to "
                          r"item 'easy' \(every answer 1\), 'hard' \(every answer 0\); .*set "
                          r"by the prior, not the data"):
            IRTFamily().make_spec(model, responses=str(exam))


def test_graded_codes_from_one_are_refused_with_a_recoding_hint(tmp_path):
    """Likert answers 1..5 left category 0 empty in every item: nonsense thresholds."""
    from ppl_vae.models.irt import IRTFamily

    likert = write(tmp_path / "likert.csv", "student,g1,g2\na,1,5\nb,3,2\nc,5,1\n")
    with pytest.raises(ResponseDataError, match=r"likert\.csv: no answer in any item is coded 0 "
                       r"\(the codes run from 1 to 5\).*recode them \(e\.g\. 1\.\.5 to 0\.\.4"):
        IRTFamily().make_spec("irt-grm", responses=str(likert))
    with pytest.warns(UserWarning, match="no answers in 'g1' category 1"):  # but trains
        spec = IRTFamily().make_spec("irt-grm", responses=str(write(
            tmp_path / "ok.csv", "student,g1,g2\na,0,4\nb,2,1\nc,4,0\n")))
    assert spec.categories == [5, 5]

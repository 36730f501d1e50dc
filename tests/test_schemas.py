"""The JSON artifacts' schemas (bdclean/schemas.py): old files read, newer ones refused in one line."""

import json

import pytest

from bdclean import schemas
from bdclean.errors import BdcleanError, InputError

SIGNATURE = {"tau": 0.8, "tau_selection": "fixed", "lambda": 0.01, "n_variants": 6, "scope": "global",
             "score": "combined", "norm_scale": "none", "layers": 2, "channels_per_layer": 4, "n_selected": 1,
             "per_layer_counts": [1, 0], "channels": [{"layer": 0, "channel": 3, "score": 1.0, "norm": 1.0,
                                                       "align": 0.5}], "heads": []}


def test_written_with_its_version_first_and_read_back(tmp_path):
    p = tmp_path / "signature.json"
    written = schemas.write(schemas.Signature, p, SIGNATURE)
    assert list(written)[0] == "schema_version" and written["schema_version"] == schemas.Signature.SCHEMA_VERSION
    assert json.loads(p.read_text()) == written
    sig = schemas.read(schemas.Signature, p)
    assert sig.lam == 0.01 and sig.channels[0].channel == 3 and sig.heads == []


def test_a_file_without_schema_version_reads_as_version_0(tmp_path):
    p = tmp_path / "signature.json"
    old = {k: v for k, v in SIGNATURE.items() if k not in ("tau_selection", "norm_scale", "heads")}
    p.write_text(json.dumps(old))
    sig = schemas.read(schemas.Signature, p)
    assert sig.schema_version == 0 and sig.tau_selection == "fixed" and sig.heads == []


@pytest.mark.parametrize("obj,needle", [
    ({**SIGNATURE, "schema_version": 99}, "newer bdclean"),
    ({**SIGNATURE, "schema_version": "1"}, "not a version number"),
    ({k: v for k, v in SIGNATURE.items() if k != "tau"}, "tau"),
    ([1, 2], "JSON object"),
])
def test_unreadable_files_fail_in_one_line(tmp_path, obj, needle):
    p = tmp_path / "signature.json"
    p.write_text(json.dumps(obj))
    with pytest.raises(InputError) as e:
        schemas.read(schemas.Signature, p)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_writers_are_held_to_the_documented_keys(tmp_path):
    with pytest.raises(BdcleanError, match="undocumented keys"):
        schemas.write(schemas.Signature, tmp_path / "s.json", {**SIGNATURE, "surprise": 1})
    assert not (tmp_path / "s.json").exists()


def test_committed_results_read():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    comp = schemas.read(schemas.Compare, root / "bench" / "results" / "demo_compare" / "compare.json")
    assert comp.schema_version == 0 and {r.method for r in comp.rows} >= {"none", "ours"}

import json
import subprocess
import sys

import pytest

from dsc.cli import main


def test_info_full_model_json(capsys):
    assert main(["info", "deepseek-v3.2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    p = data["params"]
    assert 680e9 < p["total"] < 690e9 and 670e9 < p["main"] < 673e9  # 671B + indexer, + 14B MTP
    assert 36e9 < p["activated_main"] < 39e9
    c = data["cache"]
    assert c["values_per_token_per_layer"] == {"per_head_kv": 128 * 320, "mla_latent": 576, "index_keys": 128}
    assert c["bytes_per_token"]["absorbed_latent"] == (576 + 128) * 2 * 61


def test_info_table_and_bad_model(capsys):
    assert main(["info", "tiny"]) == 0
    assert "activated per token" in capsys.readouterr().out
    assert main(["info", "no/such/model"]) == 2
    assert "neither a checkpoint path nor a preset" in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "dsc.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "info" in r.stdout


def test_a_closed_pipe_is_not_an_internal_error(monkeypatch):
    """`dsc passes --json | head -c 10`: the reader leaves early; dsc exits 0 without a crash report."""
    import io

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["passes", "--json"]) == 0


@pytest.mark.parametrize(
    "argv, names",
    [
        (["bench", "--quick", "--repeat", "0"], "--repeat"),
        (["bench", "--quick", "--warmup", "-1"], "--warmup"),
        (["bench", "--quick", "--contexts", "-5"], "--contexts"),
        (["bench", "--quick", "--drafts", "1,-1"], "--drafts"),
        (["bench", "--quick", "--generate", "1"], "--generate"),
        (["bench", "--quick", "--variants", ","], "--variants"),
        (["diff", "nowhere", "--context", "0"], "--context"),
        (["optimize", "tiny", "-o", "never-written", "--passes", ","], "--passes"),
        (["optimize", "tiny", "-o", "never-written", "--disable-pass", " , "], "--disable-pass"),
        (["generate", "tiny", "--prompt-tokens", "1", "--temperature", "nan"], "--temperature"),
        (["generate", "tiny", "--prompt-tokens", "1", "--top-p", "inf"], "--top-p"),
        (["generate", "tiny", "--prompt-tokens", "1", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["generate", "tiny", "--prompt-tokens", "1", "--prefill-chunk", "-3"], "--prefill-chunk"),
        (["generate", "tiny", "--prompt-tokens", "1", "--speculative", "x"], "--speculative"),
    ],
)
def test_arguments_out_of_range_exit_2_naming_the_flag(argv, names, capsys, tmp_path, monkeypatch):
    """The class "CLI arguments out of range": refused before any work, exit 2, the flag named, no traceback."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert names in err and "Traceback" not in err and "internal error" not in err
    assert list(tmp_path.iterdir()) == []  # nothing written (no output dir, no bench/)

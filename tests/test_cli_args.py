"""Out-of-range arguments of `densenet-fast bench/sweep/plan/train`: each one ends in one line that
names the flag and what it expects, with exit status 2, before any work; "not given" still means
the default.  Nothing here measures: the requests fail (or are stopped) before the first step."""

from __future__ import annotations

import pytest
import torch

from densenet_fast import cli

TINY = "densenet_bc_10_4"  # one layer per block; its two transitions need inputs of at least 4x4
BENCH = ["bench", "--device", "cpu", "--model", TINY, "--providers", "naive", "--plain"]
SWEEP = ["sweep", "--device", "cpu", "--providers", "naive", "--plain", "--depths", "10"]
PLAN = ["plan", "--model", TINY, "--providers", "naive", "--plain"]


def _error(capsys, argv, prefix="densenet-fast: error: "):
    """Run the command, which must refuse: status 2, one line on stderr; returns that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, needle", [
    # 0 used to be replaced by the default (`args.batch or 64`): a silently different run
    (BENCH + ["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (BENCH + ["--batch", "-1"], "argument --batch: expected a positive integer, got -1"),
    (BENCH + ["--image-size", "0"], "argument --image-size: expected a positive integer, got 0"),
    (BENCH + ["--repeats", "0"], "argument --repeats: expected a positive integer, got 0"),
    (BENCH + ["--repeats", "-3"], "argument --repeats: expected a positive integer, got -3"),
    (BENCH + ["--warmup", "-1"], "argument --warmup: expected an integer >= 0, got -1"),
    (BENCH + ["--threads", "-2"], "argument --threads: expected a positive integer, got -2"),
    (BENCH + ["--threads", "0"], "argument --threads: expected a positive integer, got 0"),
    (BENCH + ["--batch", "many"], "argument --batch: invalid int value: 'many'"),
    (SWEEP + ["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (SWEEP + ["--growth", "0"], "argument --growth: expected a positive integer, got 0"),
    (SWEEP + ["--growth", "-1"], "argument --growth: expected a positive integer, got -1"),
    (SWEEP[:-1] + [""], "--depths must list at least one DenseNet-BC depth"),
    (SWEEP[:-1] + [" , "], "--depths must list at least one DenseNet-BC depth"),
    (PLAN + ["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (PLAN + ["--batch", "-4"], "argument --batch: expected a positive integer, got -4"),
    (PLAN + ["--image-size", "-8"], "argument --image-size: expected a positive integer, got -8"),
    (PLAN + ["--image-size", "0"], "argument --image-size: expected a positive integer, got 0"),
    (PLAN + ["--device", "tpu"], "unknown device 'tpu'; expected cpu or cuda"),
    (PLAN + ["--device", "meta"], "unsupported device 'meta'; expected cpu or cuda"),
])
def test_out_of_range_numbers_are_usage_errors(capsys, argv, needle):
    assert needle in _error(capsys, argv)


@pytest.mark.parametrize("argv", [PLAN + ["--image-size", "2"], BENCH + ["--image-size", "3"]])
def test_image_size_too_small_for_the_model(capsys, argv):
    """Was torch's pooling error ('Output size is too small') as a traceback, or a failed row per case."""
    err = _error(capsys, argv)
    assert f"--image-size {argv[-1]}: too small for {TINY}" in err and "at least 4x4" in err, err


@pytest.mark.parametrize("model, smallest", [(TINY, 4), ("densenet121", 29), ("fc_densenet_3_2_8", 8)])
def test_check_image_size_names_the_smallest_size(model, smallest):
    cli.check_image_size(model, smallest)
    with pytest.raises(cli.BenchError, match=f"at least {smallest}x{smallest}"):
        cli.check_image_size(model, smallest - 1)


def test_plan_model_error_is_one_line(capsys):
    """Batch 1 at 4x4: batch norm meets one value per channel at the last 1x1 map (a ValueError
    traceback before)."""
    assert cli.main(PLAN + ["--batch", "1", "--image-size", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("densenet-fast: error: provider naive") and "--batch 1, --image-size 4" in err, err


def test_plan_cuda_allocator_needs_no_gpu():
    assert cli.check_device("cuda", need_gpu=False) == "cuda"


@pytest.mark.parametrize("command", [BENCH, SWEEP])
def test_out_and_plot_must_be_file_paths(capsys, tmp_path, command):
    """Checked before measuring (an IsADirectoryError traceback after the whole run before)."""
    (tmp_path / "file").write_text("")
    assert f"--out {tmp_path}: is a directory" in _error(capsys, command + ["--out", str(tmp_path)])
    bad = tmp_path / "file" / "x.csv"
    assert f"--out {bad}: {tmp_path / 'file'} is not a directory" in _error(capsys, command + ["--out", str(bad)])
    assert f"--plot {tmp_path}: is a directory" in _error(
        capsys, command + ["--out", str(tmp_path / "r.csv"), "--plot", str(tmp_path)])


class _Stop(Exception):
    pass


def _measured(monkeypatch, argv):
    """The cases and step counts the command would measure (stopped before the first step)."""
    seen = {}

    def measure(cases, device, repeats, warmup, display):
        seen.update(cases=cases, repeats=repeats, warmup=warmup)
        raise _Stop

    monkeypatch.setattr(cli, "measure", measure)
    with pytest.raises(_Stop):
        cli.main(argv)
    return seen


def test_not_given_still_means_the_default(monkeypatch, tmp_path):
    out = ["--out", str(tmp_path / "r.csv")]
    seen = _measured(monkeypatch, BENCH + out)
    assert [(c.batch, c.image_size) for c in seen["cases"]] == [(cli.DEFAULT_BATCH, 32)]
    assert (seen["repeats"], seen["warmup"]) == (cli.DEFAULT_REPEATS["cpu"], cli.DEFAULT_WARMUP["cpu"])
    seen = _measured(monkeypatch, BENCH + out + ["--batch", "3", "--image-size", "8", "--warmup", "0",
                                                 "--repeats", "1"])
    assert [(c.batch, c.image_size) for c in seen["cases"]] == [(3, 8)] and (seen["repeats"], seen["warmup"]) == (1, 0)
    seen = _measured(monkeypatch, SWEEP + out)
    assert {c.batch for c in seen["cases"]} == {cli.DEFAULT_SWEEP_BATCH["cpu"]}


def test_train_threads_are_checked_by_train(capsys):
    """cli.main used to call torch.set_num_threads(-2) for `train` too: a RuntimeError traceback."""
    threads = torch.get_num_threads()
    assert "--threads must be positive, got -2" in _error(capsys, ["train", "--threads", "-2"],
                                                          prefix="densenet-fast train: error: ")
    assert torch.get_num_threads() == threads


@pytest.mark.parametrize("extra, needle", [
    (["--momentum", "-1"], "--momentum must be a finite number >= 0, got -1.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--momentum", "nan"], "--momentum must be a finite number >= 0, got nan"),
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--lr", "inf"], "--lr must be a finite positive number, got inf"),
    (["--lr", "0"], "--lr must be positive, got 0.0"),
])
def test_train_optimizer_numbers(capsys, tmp_path, extra, needle):
    """Torch's SGD traceback for a negative momentum or weight decay; nan/inf lr ran a whole epoch
    and then reported divergence."""
    argv = ["train", "--output-dir", str(tmp_path / "out")] + extra
    assert needle in _error(capsys, argv, prefix="densenet-fast train: error: ")


def test_train_output_and_checkpoint_dirs_must_be_directories(capsys, tmp_path):
    """NotADirectoryError / FileExistsError tracebacks after the first epoch before."""
    afile = tmp_path / "afile"
    afile.write_text("")
    prefix = "densenet-fast train: error: "
    assert f"--output-dir {afile}: exists and is not a directory" in _error(
        capsys, ["train", "--output-dir", str(afile)], prefix)
    assert f"--output-dir {afile / 'sub'}: {afile} is not a directory" in _error(
        capsys, ["train", "--output-dir", str(afile / "sub")], prefix)
    assert f"--checkpoint-dir {afile}: exists and is not a directory" in _error(
        capsys, ["train", "--output-dir", str(tmp_path / "out"), "--checkpoint-dir", str(afile)], prefix)
    assert not (tmp_path / "out").exists()

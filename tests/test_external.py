"""`bench.py --external NAME='COMMAND'`: programs outside the suite in the same table.

Small programs written by the tests stand in for real ports: one prints the reference losses in
the original microgpt.py's format (lines ended by \\r, as the original prints them), others print
drifting losses, losses from another initialisation, NaN, nothing, or crash or hang half-way.
One real port (the suite's numpy backend in float32 driven by a script) checks the tolerance
against an honest float32 run. They all run through the real CLI in one invocation.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from bench import results
from backends.contract import preset
from bench.external import (PRECISION_SLACK, ExternalSpecError, ParsedOutput, StepLoss, judge,
                            parse_external_option)
from bench.parity import reference_losses
from bench.record import Status
from backends.contract import build_spec

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
OTHER_N = 30  # a program whose N differs from --steps gets the reference of its own N
TIMEOUT_S = 5


def reference_for(dataset, num_steps: int) -> list[float]:
    spec = build_spec(dataset.docs, preset("tiny", num_steps=num_steps))
    return reference_losses(spec, num_steps, dataset.sha256)


def step_lines(losses, total, fmt=".4f", end="\\r") -> str:
    """Python source printing the losses in the original program's format."""
    return textwrap.dedent(f"""
        for k, loss in enumerate(map(float, {[repr(float(x)) for x in losses]!r}), start=1):
            print(f"step {{k:4d}} / {total:4d} | loss {{loss:{fmt}}}", end="{end}")
        print()
    """)


def write_programs(directory: Path, dataset) -> dict[str, str]:
    """name -> Python source of each stand-in program."""
    reference = reference_for(dataset, STEPS)
    other_n = reference_for(dataset, OTHER_N)
    drift = [loss + (0 if k == 0 else 1e-3 * k) for k, loss in enumerate(reference)]
    other_init = [loss + 0.25 for loss in reference]  # the same curve from elsewhere: learning
    flat_wrong = [3.0 + 0.01 * k for k in range(STEPS)]  # wrong from step 1, and not learning
    port = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from backends.numpy_backend import NumpyBackend
        from backends.contract import preset
        from backends.contract import build_spec
        from bench.training import sample, train
        from data.dataset import load_dataset
        spec = build_spec(load_dataset().docs, preset("tiny", num_steps={STEPS}))
        backend = NumpyBackend(spec.config, spec.tokenizer.vocab_size, "float32")
        backend.load_parameters(spec.parameters)
        train(backend, spec, {STEPS}, on_step=lambda s, loss: print(
            f"step {{s + 1:4d}} / {STEPS:4d} | loss {{loss:.4f}}", end="\\r"))
        print("\\n--- inference (new, hallucinated names) ---")
        for i, name in enumerate(sample(backend, spec, 3).samples):
            print(f"sample {{i + 1:2d}}: {{name}}")
    """)
    return {
        "exact": step_lines(reference, STEPS) + 'print("sample  1: kamon")\nprint("sample  2: ")\n',
        "port32": port,
        "othern": step_lines(other_n, OTHER_N, end="\\n"),
        "drift": step_lines(drift, STEPS),
        "otherinit": step_lines(other_init, STEPS),
        "flatwrong": step_lines(flat_wrong, STEPS),
        "nan": step_lines(reference[:2] + [float("nan")], STEPS),
        "chatty": 'print("hello, this is not a loss line")\n',
        "silent": "",
        "crash": step_lines(reference[:10], STEPS)
        + 'import sys\nprint("boom: out of cheese", file=sys.stderr)\nsys.exit(3)\n',
        "hang": step_lines(reference[:5], STEPS) + "import time\ntime.sleep(600)\n",
    }


@pytest.fixture(scope="module")
def external_run(tmp_path_factory, dataset):
    directory = tmp_path_factory.mktemp("externals")
    options = []
    for name, source in write_programs(directory, dataset).items():
        path = directory / f"{name}.py"
        path.write_text(source)
        options += ["--external", f"{name}={sys.executable} {path}"]
    result_path = directory / "run.json"
    completed = subprocess.run(
        [sys.executable, "bench.py", "--backend", "numpy", "--steps", str(STEPS), "--warmup",
         "0", "--samples", "2", "--timeout", str(TIMEOUT_S), "--json", str(result_path),
         *options],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    document = results.load(result_path)
    runs = {run["backend"]: run for run in document["runs"]}
    return completed, document, runs, dataset


def test_every_external_is_in_the_table_and_the_file(external_run):
    completed, document, runs, _ = external_run
    assert completed.returncode == 1, completed.stderr  # several of them fail on purpose
    assert "Traceback" not in completed.stderr
    assert document["complete"]
    assert set(runs) == {"numpy", "exact", "port32", "othern", "drift", "otherinit",
                         "flatwrong", "nan", "chatty", "silent", "crash", "hang"}
    assert runs["numpy"]["status"] == "ok"
    for name, run in runs.items():
        if name != "numpy":
            assert (run["kind"], run["device"], run["dtype"]) == ("external", "external",
                                                                  "unknown")
            assert f"{name} " in completed.stdout  # a row of the printed table


def test_matching_program_is_ok_with_wall_time_per_step(external_run):
    _, _, runs, dataset = external_run
    run = runs["exact"]
    assert run["status"] == "ok", run.get("error")
    assert run["steps"] == STEPS and run["train"]["loss_steps"] == list(range(1, STEPS + 1))
    reference = reference_for(dataset, STEPS)
    assert max(abs(a - b) for a, b in zip(run["train"]["losses"], reference)) <= 5e-5
    assert run["parity"]["passed"] and run["parity"]["tolerance"] == pytest.approx(
        5e-5 + PRECISION_SLACK)
    assert run["train"]["ms_per_step_median"] == pytest.approx(1e3 * run["wall_s"] / STEPS)
    assert "process start" in run["train"]["timing"]
    assert run["infer"]["samples"] == ["kamon", ""]


def test_float32_port_in_the_original_format_is_ok(external_run):
    run = external_run[2]["port32"]
    assert run["status"] == "ok", run.get("error")
    assert len(run["train"]["losses"]) == STEPS and len(run["infer"]["samples"]) == 3


def test_reference_follows_the_programs_own_number_of_steps(external_run):
    run = external_run[2]["othern"]
    assert run["status"] == "ok", run.get("error")
    assert run["steps"] == OTHER_N and run["config"]["num_steps"] == OTHER_N


def test_drifting_losses_fail_parity(external_run):
    run = external_run[2]["drift"]
    assert run["status"] == "parity-failed"
    assert run["parity"]["first_failing_step"] == 2
    assert run["error"].startswith("step 1 matches the float64 reference but step 2 does not")


def test_another_initialisation_is_timed_but_not_verified(external_run):
    run = external_run[2]["otherinit"]
    assert run["status"] == Status.DIFFERENT_INIT
    assert "another initialisation" in run["error"]
    assert run["train"]["ms_per_step_median"] > 0


def test_wrong_from_the_start_and_not_learning_fails(external_run):
    run = external_run[2]["flatwrong"]
    assert run["status"] == "parity-failed" and "does not decrease" in run["error"]


def test_nan_loss_is_diverged(external_run):
    run = external_run[2]["nan"]
    assert run["status"] == "diverged" and run["error"] == "loss is nan at step 3"


def test_output_without_step_lines_is_a_clear_error(external_run):
    completed, _, runs, _ = external_run
    assert runs["chatty"]["status"] == "error"
    assert runs["chatty"]["error"] == ("chatty printed no `step K / N | loss X` lines; its last "
                                       "output line: 'hello, this is not a loss line'")
    assert runs["silent"]["error"].endswith("(its output was empty)")
    assert "chatty (unknown): error: chatty printed no" in completed.stdout


def test_crash_keeps_the_printed_steps_and_stderr_reason(external_run):
    run = external_run[2]["crash"]
    assert run["status"] == "crashed"
    assert run["error"] == ("crash after printing step 10 of 20: exited with code 3: boom: out "
                            "of cheese")
    assert len(run["train"]["losses"]) == 10 and run["parity"]["passed"]


def test_hang_is_killed_at_the_timeout(external_run):
    run = external_run[2]["hang"]
    assert run["status"] == "timeout"
    assert f"no result within the timeout of {TIMEOUT_S} s" in run["error"]
    assert run["train"]["loss_steps"] == [1, 2, 3, 4, 5]


# ---- usage errors and the other paths, each its own small run ------------------------------
def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "bench.py", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_nonexistent_command_is_a_usage_error(tmp_path):
    path = tmp_path / "x.json"
    completed = run_cli("--backend", "numpy", "--external", "ghost=no-such-program-h7 --fast",
                        "--json", str(path))
    assert completed.returncode == 2
    assert completed.stderr.strip() == ("error: --external ghost: command 'no-such-program-h7' "
                                        "not found (not on PATH and not an executable file)")
    assert not path.exists()


@pytest.mark.parametrize("option, message", [
    ("justaname", "expected NAME='COMMAND ...'"),
    ("numpy=echo hi", "already used by a backend"),
    ("bad name=echo", "must be letters, digits"),
    ("q=echo 'unclosed", "cannot split the command"),
    ("empty=", "expected NAME='COMMAND ...'"),
])
def test_malformed_external_options(option, message):
    with pytest.raises(ExternalSpecError, match=message):
        parse_external_option(option, taken_names={"numpy"})


def test_repeats_are_fresh_processes_interleaved_with_backends(tmp_path, dataset):
    program = tmp_path / "pid.py"
    program.write_text("import os\nprint('pid', os.getpid())\n"
                       + step_lines(reference_for(dataset, STEPS), STEPS))
    path = tmp_path / "r.json"
    completed = run_cli("--backend", "numpy", "--steps", str(STEPS), "--warmup", "0",
                        "--repeat", "3", "--external", f"pid={sys.executable} {program}",
                        "--json", str(path))
    assert completed.returncode == 0, completed.stderr
    runs = results.load(path)["runs"]
    externals = [run for run in runs if run["backend"] == "pid"]
    assert [run["repeat"] for run in externals] == [0, 1, 2]
    assert all(run["status"] == "ok" for run in runs)
    pids = {run["stdout_tail"][0] for run in externals}
    assert len(pids) == 3  # a fresh process each time


def test_external_out_of_memory_under_the_limit(tmp_path):
    program = tmp_path / "hog.py"
    program.write_text("print('step    1 / 20 | loss 3.3660')\nblock = bytearray(8 * 2 ** 30)\n")
    path = tmp_path / "m.json"
    completed = run_cli("--backend", "numpy", "--steps", str(STEPS), "--warmup", "0",
                        "--memory-limit", "1000", "--external", f"hog={sys.executable} {program}",
                        "--json", str(path))
    assert completed.returncode == 1
    run = next(run for run in results.load(path)["runs"] if run["backend"] == "hog")
    assert run["status"] == "out-of-memory"
    assert run["error"].startswith("out of memory under the --memory-limit of 1000 MB; hog after "
                                   "printing step 1 of 20: exited with code 1: MemoryError")


# ---- the parser and the verdict, without processes -----------------------------------------
def test_parser_reads_the_original_format():
    parsed = ParsedOutput()
    assert parsed.feed("step    1 / 1000 | loss 3.3660").loss == 3.366
    assert parsed.feed("step 1000 / 1000 | loss 2.6497") is not False
    assert parsed.feed("sample  1: kamon") is True
    assert parsed.feed("sample 20: ") is True
    assert parsed.feed("--- inference (new, hallucinated names) ---") is False
    assert parsed.totals == {1000} and sorted(parsed.steps) == [1, 1000]
    assert parsed.steps[1].half_unit == pytest.approx(5e-5)
    assert parsed.samples == {1: "kamon", 20: ""}
    parsed.feed("step 3 / 10 | loss 2.5000e+00")
    assert parsed.steps[3].loss == 2.5 and parsed.steps[3].half_unit == pytest.approx(5e-5)
    # Too few digits to check the loss against a tolerance taken from them: not believed.
    parsed.feed("step 4 / 10 | loss 2.5e+00")
    assert 4 not in parsed.steps and "too few digits" in parsed.problems[0]


def test_judge_tolerance_is_print_rounding_plus_float32_slack():
    reference = [3.0, 2.9]
    tolerance = 5e-5 + PRECISION_SLACK
    just_inside = [StepLoss(1, 3.0, 5e-5), StepLoss(2, 2.9 + tolerance * 0.99, 5e-5)]
    assert judge(just_inside, reference, 27)[0] == "ok"
    just_outside = [StepLoss(1, 3.0, 5e-5), StepLoss(2, 2.9 + tolerance * 1.01, 5e-5)]
    assert judge(just_outside, reference, 27)[0] == "parity-failed"
    runaway = [StepLoss(1, 3.0, 5e-5), StepLoss(2, 5000.0, 5e-5)]
    assert judge(runaway, reference, 27)[:2] == ("diverged", "loss 5000 at step 2")


def test_external_lines_in_the_markdown_report(external_run):
    _, document, _, _ = external_run
    report = results.markdown_report(document)
    assert "| exact | - | external | unknown |" in report
    assert "- crash (unknown): crashed: crash after printing step 10 of 20" in report


def test_ctrl_c_during_an_external_program(tmp_path, dataset):
    marker = tmp_path / "started"
    program = tmp_path / "sleepy.py"
    program.write_text(step_lines(reference_for(dataset, STEPS)[:3], STEPS, end="\\n")
                       + f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n"
                       + "time.sleep(600)\n")
    path = tmp_path / "i.json"
    process = subprocess.Popen(
        [sys.executable, "bench.py", "--backend", "numpy", "--steps", str(STEPS), "--warmup",
         "0", "--quiet", "--external", f"sleepy={sys.executable} {program}", "--json",
         str(path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not marker.exists() or not marker.read_text():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.02)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr
    runs = {run["backend"]: run for run in results.load(path)["runs"]}
    assert runs["numpy"]["status"] == "ok"
    assert runs["sleepy"]["status"] == "interrupted"
    assert runs["sleepy"]["train"]["loss_steps"] == [1, 2, 3]
    with pytest.raises(ProcessLookupError):  # the program was stopped with the run
        os.kill(int(marker.read_text()), 0)

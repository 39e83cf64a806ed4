"""Programs outside the suite in the same table: `bench.py --external NAME='COMMAND'` and
`bench.py --external-file port.toml`.

Small programs written by the tests stand in for real ports: they print the reference's losses
and samples in the original microgpt.py's format (step lines ended by \\r, as the original
prints them), or the same run cut short, with one sample changed, with one loss off by one in
its last digit, in another format read through patterns, from their own folder, after seconds
of start-up, or they drift, diverge, crash, hang, cannot be built or cannot start. The
project's example port (examples/microgpt_port) runs from a copy of its folder. They all run
through the real CLI in one invocation, with no backend: --external and --external-file alone
run only the programs named.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backends.contract import build_spec, preset
from bench import results
from bench.external import (ExternalProgram, ExternalSpecError, ParsedOutput, StepLoss,
                            build_program, compare_samples, first_error_line, judge, line_timing,
                            load_description, missing_steps, parse_external_option)
from bench.parity import LOSS_TOLERANCE, ReferenceLosses, reference_losses
from bench.record import BASIS_END_TO_END, BASIS_STEADY_STATE, Status
from bench.reference import reference_samples

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "microgpt_port"
PORT = "microgpt-port"  # the example's name in its port.toml
STEPS = 20
SAMPLES = 3
OTHER_N = 30  # a program whose N differs from --steps gets the reference of its own N
TIMEOUT_S = 8
START_UP_S = 1.5  # the slow starter's set-up before its first step
STEP_PAUSE_S = 0.005  # and its time per step after it


def spec_of(dataset, num_steps: int):
    return build_spec(dataset.docs, preset("tiny", num_steps=num_steps))


def reference_for(dataset, num_steps: int) -> list[float]:
    return reference_losses(spec_of(dataset, num_steps), num_steps, dataset.sha256)


def step_texts(losses, total) -> list[str]:
    """Step lines in the original's format."""
    return [f"step {k:4d} / {total:4d} | loss {loss:.4f}" for k, loss in enumerate(losses, 1)]


def sample_texts(names) -> list[str]:
    return [f"sample {k:2d}: {name}" for k, name in enumerate(names, 1)]


def printing(steps: list[str], samples: list[str] = (), end: str = "\r", before: str = "",
             pause_s: float = 0.0, after: str = "") -> str:
    """Python source that runs `before`, prints the step lines (each ended by `end`, flushed,
    `pause_s` apart), then the sample lines, then runs `after`."""
    return "\n".join([
        "import sys, time", before,
        f"for line in {list(steps)!r}:",
        f"    print(line, end={end!r}, flush=True)",
        f"    time.sleep({pause_s})",
        "print()",
        f"for line in {list(samples)!r}:",
        "    print(line)",
        after, ""])


def off_by_one_in_the_last_digit(loss: float) -> str:
    """The loss printed to 4 decimals, then moved one unit away from the true value."""
    printed = round(loss, 4)
    return f"{printed + 1e-4 if printed >= loss else printed - 1e-4:.4f}"


def quick_programs(dataset) -> dict[str, str]:
    """name -> Python source of each program run through --external NAME=COMMAND."""
    reference = reference_for(dataset, STEPS)
    samples = sample_texts(reference_samples(spec_of(dataset, STEPS), STEPS, SAMPLES))
    steps = step_texts(reference, STEPS)
    other_n = step_texts(reference_for(dataset, OTHER_N), OTHER_N)
    drift = step_texts([loss + (0 if k == 0 else 1e-3 * k) for k, loss in enumerate(reference)],
                       STEPS)
    other_init = step_texts([loss + 0.25 for loss in reference], STEPS)  # learning, elsewhere
    flat_wrong = step_texts([3.0 + 0.01 * k for k in range(STEPS)], STEPS)
    last_digit = list(steps)
    last_digit[4] = f"step    5 / {STEPS:4d} | loss {off_by_one_in_the_last_digit(reference[4])}"
    wrong_sample = list(samples)
    wrong_sample[1] = "sample  2: zzz"
    return {
        "exact": printing(steps, samples),
        "othern": printing(other_n, end="\n"),
        "short": printing(steps[:10], samples),  # exits 0 after step 10
        "wrongsample": printing(steps, wrong_sample),
        "lastdigit": printing(last_digit, samples),
        "slowstart": printing(steps, samples, end="\n", before=f"time.sleep({START_UP_S})",
                              pause_s=STEP_PAUSE_S),
        "drift": printing(drift),
        "otherinit": printing(other_init),
        "flatwrong": printing(flat_wrong),
        "nan": printing(steps[:2] + [f"step    3 / {STEPS:4d} | loss nan"]),
        "chatty": 'print("hello, this is not a loss line")\n',
        "silent": "",
        "crash": printing(steps[:10], after='print("boom: out of cheese", file=sys.stderr)\n'
                                            'sys.exit(3)'),
        "hang": printing(steps[:5], after="time.sleep(600)"),
    }


def write_description(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "port.toml"
    path.write_text(textwrap.dedent(text))
    return path


def described_programs(directory: Path, dataset) -> list[Path]:
    """The --external-file programs: each a folder with its description."""
    reference = reference_for(dataset, STEPS)
    names = reference_samples(spec_of(dataset, STEPS), STEPS, SAMPLES)
    python = sys.executable

    # The project's example port, from a copy of its folder (a run writes its input.txt).
    port = directory / "port"
    shutil.copytree(EXAMPLE, port, ignore=shutil.ignore_patterns("input.txt"))

    # Another output format, read through the description's patterns (N given by `steps`).
    other_format = directory / "patterns"
    other_format.mkdir()
    (other_format / "run.py").write_text(printing(
        [f"iter {k}: loss={loss:.5f}" for k, loss in enumerate(reference, 1)],
        [f"name> {name}" for name in names], end="\n"))

    # A program that reads its data and a file of its own from its working directory, and a
    # variable of its description's environment.
    in_folder = directory / "needscwd" / "prog"
    in_folder.mkdir(parents=True)
    (in_folder / "expected.txt").write_text("\n".join(step_texts(reference, STEPS)))
    (in_folder / "run.py").write_text(textwrap.dedent(f"""
        import os
        names = open("names.txt").read().split()
        assert len(names) == {len(dataset.docs)}, len(names)
        assert os.environ["PORT_GREETING"] == "hello"
        for line in open("expected.txt").read().splitlines():
            print(line, flush=True)
        for k, name in enumerate({names!r}, 1):
            print(f"sample {{k}}: {{name}}")
    """))

    # A float32 port (the suite's numpy backend in float32, driven by a script).
    float32 = directory / "port32"
    float32.mkdir()
    (float32 / "run.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from backends.numpy_backend import NumpyBackend
        from backends.contract import build_spec, preset
        from bench.training import sample, train
        from data.dataset import load_dataset
        spec = build_spec(load_dataset().docs, preset("tiny", num_steps={STEPS}))
        backend = NumpyBackend(spec.config, spec.tokenizer.vocab_size, "float32")
        backend.load_parameters(spec.parameters)
        train(backend, spec, {STEPS}, on_step=lambda s, loss: print(
            f"step {{s + 1:4d}} / {STEPS:4d} | loss {{loss:.4f}}", end="\\r"))
        print("\\n--- inference (new, hallucinated names) ---")
        for i, name in enumerate(sample(backend, spec, {SAMPLES}).samples):
            print(f"sample {{i + 1:2d}}: {{name}}")
    """))

    # A build that fails among other output, and a program file that is not executable.
    broken = directory / "badbuild"
    broken.mkdir()
    (broken / "build.py").write_text(textwrap.dedent("""
        import sys
        print("Compiling port v0.1.0")
        print("warning: unused variable `x`", file=sys.stderr)
        print("src/main.rs:3:5: error: expected `;`", file=sys.stderr)
        print("error: could not compile `port` due to 1 previous error", file=sys.stderr)
        sys.exit(101)
    """))
    not_executable = directory / "notexec"
    not_executable.mkdir()
    (not_executable / "run.sh").write_text("#!/bin/sh\necho 'step 1 / 20 | loss 3.3660'\n")

    return [
        port / "port.toml",
        write_description(other_format, f"""
            name = "patterns"
            command = [{python!r}, "run.py"]
            precision = "float64"
            steps = {STEPS}
            step_line = '^iter (?P<step>\\d+): loss=(?P<loss>\\S+)$'
            sample_line = '^name> (?P<sample>.*)$'
        """),
        write_description(directory / "needscwd", f"""
            name = "needscwd"
            command = [{python!r}, "run.py"]
            directory = "prog"
            dataset = "names.txt"
            [env]
            PORT_GREETING = "hello"
        """),
        write_description(float32, f"""
            name = "port32"
            command = [{python!r}, "run.py"]
            precision = "float32"
        """),
        write_description(broken, f"""
            name = "badbuild"
            command = ["./port"]
            build = [{python!r}, "build.py"]
        """),
        write_description(not_executable, """
            name = "notexec"
            command = ["./run.sh"]
        """),
    ]


@pytest.fixture(scope="module")
def external_run(tmp_path_factory, dataset):
    directory = tmp_path_factory.mktemp("externals")
    options = []
    for name, source in quick_programs(dataset).items():
        path = directory / f"{name}.py"
        path.write_text(source)
        options += ["--external", f"{name}={sys.executable} {path}"]
    options += ["--external", "exit127=env no-such-program-h7"]
    for description in described_programs(directory, dataset):
        options += ["--external-file", str(description)]
    result_path = directory / "run.json"
    completed = subprocess.run(
        [sys.executable, "bench.py", "--steps", str(STEPS), "--samples", str(SAMPLES),
         "--timeout", str(TIMEOUT_S), "--json", str(result_path), *options],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    document = results.load(result_path)
    runs = {run["backend"]: run for run in document["runs"]}
    return completed, document, runs, directory


def test_programs_named_alone_run_alone(external_run):
    completed, document, runs, _ = external_run
    assert completed.returncode == 1, completed.stderr  # several of them fail on purpose
    assert "Traceback" not in completed.stderr
    assert document["complete"]
    assert all(run["kind"] == "external" for run in document["runs"])  # no backend ran
    assert {"exact", PORT, "patterns", "needscwd", "badbuild", "notexec"} <= set(runs)
    assert runs["exact"]["dtype"] == "unknown" and runs[PORT]["dtype"] == "float64"
    assert "exact " in completed.stdout  # a row of the printed table


def test_the_example_port_is_ok_with_its_three_times(external_run):
    completed, _, runs, directory = external_run
    run = runs[PORT]
    assert run["status"] == Status.OK, run.get("error")
    assert run["command"][-4:] == ["--steps", str(STEPS), "--samples", str(SAMPLES)]
    assert run["train"]["loss_steps"] == list(range(1, STEPS + 1))
    assert run["parity"]["passed"] and run["parity"]["precision"] == "float64"
    assert run["parity"]["samples"] == f"{SAMPLES} samples equal the reference's"
    # The suite placed its verified dataset where the description says the port reads it.
    assert (directory / "port" / "input.txt").read_bytes() == (REPO / "data" / "cache" /
                                                               "names.txt").read_bytes()
    timing = run["timing"]
    assert timing["basis"] == BASIS_STEADY_STATE and timing["steady_state"]["intervals"] == 19
    assert run["train"]["ms_per_step_median"] == timing["steady_state"]["median"]
    assert 0 < timing["first_step_line_s"] < timing["last_step_line_s"] < timing["end_to_end_s"]
    line = next(line for line in completed.stderr.splitlines() if f"{PORT} (external)" in line)
    assert "ok, steady state" in line and "first step line after" in line \
        and "end to end" in line


def test_faithful_quick_program_is_ok(external_run):
    _, _, runs, _ = external_run
    run = runs["exact"]
    assert run["status"] == Status.OK, run.get("error")
    assert run["infer"]["samples"] and len(run["infer"]["samples"]) == SAMPLES
    # Float64 unless declared: held to half a unit of the printed 4 decimals.
    assert run["parity"]["tolerance"] == pytest.approx(5e-5 + LOSS_TOLERANCE["float64"])
    # Its lines come without pauses: a steady state where they arrived one read each,
    # end-to-end / N (said so) where they came in batches.
    assert run["train"]["ms_per_step_basis"] in (BASIS_STEADY_STATE, BASIS_END_TO_END)


def test_start_up_of_seconds_then_fast_steps_reads_the_steady_state(external_run):
    run = external_run[2]["slowstart"]
    assert run["status"] == Status.OK, run.get("error")
    timing = run["timing"]
    assert timing["basis"] == BASIS_STEADY_STATE, timing["steady_state_unavailable"]
    assert timing["first_step_line_s"] >= START_UP_S
    # wall / N would be more than START_UP_S / N = 75 ms; the steps take ~5 ms.
    assert timing["end_to_end_per_step_ms"] > 1e3 * START_UP_S / STEPS
    assert 1e3 * STEP_PAUSE_S * 0.9 < run["train"]["ms_per_step_median"] < 40


def test_cut_short_with_exit_0_is_incomplete(external_run):
    run = external_run[2]["short"]
    assert run["status"] == Status.INCOMPLETE
    assert run["error"] == ("short exited 0 after printing step 10 of 20: the run did not "
                            "finish, so it is not timed")
    assert run["train"]["steps_completed"] == 10 and "ms_per_step_median" not in run["train"]


def test_one_wrong_sample_is_samples_differ(external_run):
    run = external_run[2]["wrongsample"]
    assert run["status"] == Status.SAMPLES_DIFFER
    assert run["error"].startswith("sample 2 is 'zzz' where the reference draws ")
    assert run["error"].endswith("1 of 3 printed samples differ")
    assert not run["parity"]["passed"]


def test_loss_off_by_one_in_the_last_digit_is_loss_differs(external_run):
    run = external_run[2]["lastdigit"]
    assert run["status"] == Status.LOSS_DIFFERS
    assert run["parity"]["first_failing_step"] == 5
    assert run["error"].startswith("step 1 matches the float64 reference but step 5 does not")


def test_another_format_through_patterns(external_run):
    run = external_run[2]["patterns"]
    assert run["status"] == Status.OK, run.get("error")
    assert run["steps"] == STEPS and len(run["infer"]["samples"]) == SAMPLES
    # Five decimals: half a unit of the fifth.
    assert run["parity"]["tolerance"] == pytest.approx(5e-6 + LOSS_TOLERANCE["float64"])


def test_program_that_needs_its_working_directory(external_run):
    run = external_run[2]["needscwd"]
    assert run["status"] == Status.OK, (run.get("error"), run.get("stderr_tail"))
    assert run["directory"].endswith(os.path.join("needscwd", "prog"))


def test_declared_float32_port_gets_the_float32_allowance(external_run):
    run = external_run[2]["port32"]
    assert run["status"] == Status.OK, run.get("error")
    assert run["dtype"] == "float32"
    assert run["parity"]["tolerance"] >= 5e-5 + LOSS_TOLERANCE["float32"]


def test_failed_build_shows_its_first_error_line(external_run):
    completed, _, runs, _ = external_run
    run = runs["badbuild"]
    assert run["status"] == Status.ERROR
    assert run["error"].startswith(f"build `{sys.executable} build.py` failed: exited with "
                                   f"code 101: src/main.rs:3:5: error: expected `;`")
    assert "Building badbuild" in completed.stderr


def test_programs_that_cannot_start(external_run):
    _, _, runs, _ = external_run
    assert runs["notexec"]["status"] == Status.CANNOT_START
    assert "is not executable" in runs["notexec"]["error"]
    assert runs["exit127"]["status"] == Status.CANNOT_START
    assert runs["exit127"]["error"].startswith(
        "exit127 exited with code 127 before printing a step line: the command it runs was "
        "not found")


def test_reference_follows_the_programs_own_number_of_steps(external_run):
    run = external_run[2]["othern"]
    assert run["status"] == Status.OK, run.get("error")
    assert run["steps"] == OTHER_N and run["config"]["num_steps"] == OTHER_N
    assert run["parity"]["samples"] == "no sample lines printed: sampling not checked"


def test_drifting_losses_differ(external_run):
    run = external_run[2]["drift"]
    assert run["status"] == Status.LOSS_DIFFERS
    assert run["parity"]["first_failing_step"] == 2


def test_another_initialisation_is_a_status_with_a_note(external_run):
    run = external_run[2]["otherinit"]
    assert run["status"] == Status.DIFFERENT_INIT
    assert "error" not in run and "another initialisation" in run["note"]
    assert run["train"]["ms_per_step_median"] > 0


def test_wrong_from_the_start_and_not_learning_differs(external_run):
    run = external_run[2]["flatwrong"]
    assert run["status"] == Status.LOSS_DIFFERS and "does not decrease" in run["error"]


def test_nan_loss_is_diverged(external_run):
    run = external_run[2]["nan"]
    assert run["status"] == Status.DIVERGED and run["error"] == "loss is nan at step 3"


def test_output_without_step_lines_is_a_clear_error(external_run):
    _, _, runs, _ = external_run
    assert runs["chatty"]["status"] == Status.ERROR
    assert runs["chatty"]["error"] == ("chatty printed no `step K / N | loss X` lines; its last "
                                       "output line: 'hello, this is not a loss line'")
    assert runs["silent"]["error"].endswith("(its output was empty)")


def test_crash_keeps_the_printed_steps_and_stderr_reason(external_run):
    run = external_run[2]["crash"]
    assert run["status"] == Status.CRASHED
    assert run["error"] == ("crash after printing step 10 of 20: exited with code 3: boom: out "
                            "of cheese")
    assert len(run["train"]["losses"]) == 10 and run["parity"]["passed"]


def test_hang_is_killed_at_the_timeout(external_run):
    run = external_run[2]["hang"]
    assert run["status"] == Status.TIMEOUT
    assert f"no result within the timeout of {TIMEOUT_S} s" in run["error"]
    assert run["train"]["loss_steps"] == [1, 2, 3, 4, 5]


def test_external_rows_in_the_markdown_report(external_run):
    _, document, _, _ = external_run
    report = results.markdown_report(document)
    assert "| exact | - | external | unknown |" in report
    assert "External programs (device \"external\") are timed from outside" in report
    assert "- crash (unknown, 20 steps): crashed: crash after printing step 10 of 20" in report
    assert "- otherinit (unknown, 20 steps): different init: " in report
    port_line = next(line for line in report.splitlines()
                     if line.startswith(f"- {PORT} (float64, 20 steps): `"))
    assert "steady state" in port_line and "first step line after" in port_line
    # Rows of 20 and 30 steps share the table: a steps column and a warning.
    assert "| steps |" in report and "rows of different step counts" in report
    assert f"--external-file {document['command'][-1]}" in results.command_text(
        document["command"])


# ---- usage errors and the other paths, each its own small run ------------------------------
def run_cli(*args, timeout=120):
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


def test_bad_description_is_a_usage_error(tmp_path):
    description = write_description(tmp_path, """
        name = "typo"
        comand = ["python3", "port.py"]
    """)
    completed = run_cli("--external-file", str(description), "--json", str(tmp_path / "x.json"))
    assert completed.returncode == 2
    assert "unknown key 'comand' (did you mean 'command'?)" in completed.stderr


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


@pytest.mark.parametrize("text, message", [
    ('name = "x"\ncommand = "python3 port.py"', "command must be a non-empty list of strings"),
    ('name = "x"', "command is missing"),
    ('name = "x"\ncommand = ["p"]\nprecision = "bf16"', "precision must be"),
    ('name = "x"\ncommand = ["p"]\ndataset = "../names.txt"', "must be a file name inside"),
    ('name = "x"\ncommand = ["p", "{steps}"]\nsteps = 10', "remove one"),
    ('name = "x"\ncommand = ["p"]\nstep_line = "(?P<step>\\\\d+)"', "(?P<loss>...)"),
    ('name = "x"\ncommand = ["p"]\nstep_line = "(?P<step>\\\\d+) (?P<loss>\\\\S+)"',
     "must give steps"),
    ('name = "numpy"\ncommand = ["p"]', "already used"),
])
def test_malformed_descriptions(tmp_path, text, message):
    path = tmp_path / "port.toml"
    path.write_text(text)
    with pytest.raises(ExternalSpecError, match=re.escape(message)):
        load_description(path, taken_names={"numpy"})


def test_placeholders_follow_the_run(tmp_path):
    path = tmp_path / "port.toml"
    path.write_text('name = "p"\ncommand = ["p", "--steps={steps}", "-n", "{samples}"]\n')
    program = load_description(path).for_run(25, 4)
    assert program.argv == ("p", "--steps=25", "-n", "4")
    assert (program.steps, program.samples) == (25, 4)
    fixed = ExternalProgram("q", ("q",), steps=1000)
    assert fixed.for_run(25, 4) is fixed  # no placeholder: it runs its own N


def test_repeats_are_fresh_processes_interleaved_with_backends(tmp_path, dataset):
    program = tmp_path / "pid.py"
    program.write_text("import os\nprint('pid', os.getpid())\n"
                       + printing(step_texts(reference_for(dataset, STEPS), STEPS)))
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
    completed = run_cli("--steps", str(STEPS), "--warmup", "0", "--memory-limit", "1000",
                        "--external", f"hog={sys.executable} {program}", "--json", str(path))
    assert completed.returncode == 1
    run = next(run for run in results.load(path)["runs"] if run["backend"] == "hog")
    assert run["status"] == "out-of-memory"
    assert run["error"].startswith("out of memory under the --memory-limit of 1000 MB; hog after "
                                   "printing step 1 of 20: exited with code 1: MemoryError")


def test_ctrl_c_during_an_external_program(tmp_path, dataset):
    marker = tmp_path / "started"
    program = tmp_path / "sleepy.py"
    program.write_text(printing(step_texts(reference_for(dataset, STEPS)[:3], STEPS), end="\n",
                                after=f"import os\nopen({str(marker)!r}, 'w').write("
                                      f"str(os.getpid()))\ntime.sleep(600)"))
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


# ---- the parts, without the CLI ------------------------------------------------------------
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


def test_judge_tolerance_is_half_a_unit_plus_the_declared_precision():
    reference = ReferenceLosses([3.0, 2.9], float32_drift=[0.0, 0.0])
    float64 = 5e-5 + LOSS_TOLERANCE["float64"]
    inside = [StepLoss(1, 3.0, 5e-5), StepLoss(2, 2.9 + float64 * 0.99, 5e-5)]
    assert judge(inside, reference, 27)[0] == Status.OK
    # One unit of the last digit off is outside, unless the program declares float32.
    one_unit = [StepLoss(1, 3.0, 5e-5), StepLoss(2, 2.9 + 1e-4, 5e-5)]
    assert judge(one_unit, reference, 27)[0] == Status.LOSS_DIFFERS
    assert judge(one_unit, reference, 27, "float32")[0] == Status.OK
    runaway = [StepLoss(1, 3.0, 5e-5), StepLoss(2, 5000.0, 5e-5)]
    assert judge(runaway, reference, 27)[:2] == (Status.DIVERGED, "loss 5000 at step 2")


def test_missing_steps_and_samples():
    printed = [StepLoss(step, 3.0, 5e-5) for step in (1, 2, 4)]
    assert missing_steps(printed, 5) == [3, 5]
    assert compare_samples({1: "ana", 2: "bo"}, ["ana", "bo", "cy"]) is None
    assert compare_samples({1: "ana", 2: "bx"}, ["ana", "bo"]) == (
        "sample 2 is 'bx' where the reference draws 'bo'; 1 of 2 printed samples differ")


def test_line_timing_reads_the_steady_state_not_wall_over_n():
    # Launched at 0, three seconds of start-up, then a step line every millisecond, one read
    # each; the process ends a second after its last line.
    arrivals = {step: (3.0 + 1e-3 * (step - 1), step) for step in range(1, 101)}
    timing = line_timing(arrivals, launched=0.0, wall_s=4.099, total=100)
    assert timing["basis"] == BASIS_STEADY_STATE
    assert timing["steady_state"]["median"] == pytest.approx(1.0)
    assert timing["steady_state"]["intervals"] == 99
    assert timing["first_step_line_s"] == pytest.approx(3.0)
    assert timing["end_to_end_per_step_ms"] == pytest.approx(40.99)
    # The same lines all in one read (a buffered stdout): no steady state, and why.
    batched = {step: (3.0, 1) for step in range(1, 101)}
    timing = line_timing(batched, launched=0.0, wall_s=4.0, total=100)
    assert timing["basis"] == BASIS_END_TO_END and timing["steady_state"] is None
    assert "flush stdout after every step line" in timing["steady_state_unavailable"]


def test_build_runs_once_per_description(tmp_path):
    counter = tmp_path / "builds.txt"
    description = write_description(tmp_path, f"""
        name = "built"
        command = ["./port"]
        build = [{sys.executable!r}, "-c", "open('builds.txt', 'a').write('x')"]
    """)
    program = load_description(description)
    cache = tmp_path / "cache"
    assert build_program(program, timeout_s=30, cache_dir=cache) == (None, False)
    assert build_program(program, timeout_s=30, cache_dir=cache) == (None, True)
    assert counter.read_text() == "x"
    # Another description (here: one more line) is built again.
    description.write_text(description.read_text() + "# changed\n")
    assert build_program(load_description(description), timeout_s=30,
                         cache_dir=cache) == (None, False)
    assert counter.read_text() == "xx"


def test_first_error_line_of_a_build():
    lines = [(0.0, "Compiling"), (0.1, "warning: unused"), (0.2, "main.c:1:2: error: oops"),
             (0.3, "make: *** [all] Error 1"), (0.15, "NameError: name 'x' is not defined")]
    assert first_error_line(lines) == "NameError: name 'x' is not defined"
    assert first_error_line([(0.0, "all good")]) is None

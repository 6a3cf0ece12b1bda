"""l2t_core.model_lock: readers share a model directory, a rebuild has it alone, and whoever cannot
have it fails at once, naming the holders; a killed holder blocks nobody."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from l2t_core.model_lock import ModelInUse, building_model, holders, lock_path, using_model


def test_readers_share_and_a_rebuild_is_refused_while_they_read(tmp_path):
    d = tmp_path / "models" / "tiny-sft"
    with using_model(d, exclusive=False, who="checkpoints[tiny-sft|l2t] of run a"):
        with using_model(d, exclusive=False, who="benchmark_reports[tiny-sft|grpo] of run b"):
            assert sorted(holders(d)) == [f"benchmark_reports[tiny-sft|grpo] of run b (reading, pid {os.getpid()})",
                                          f"checkpoints[tiny-sft|l2t] of run a (reading, pid {os.getpid()})"]
            with pytest.raises(ModelInUse, match=r"cannot rebuild .*tiny-sft: it is in use by checkpoints"
                                                 r"\[tiny-sft\|l2t\] of run a .*; benchmark_reports\[tiny-sft\|grpo\] "
                                                 r"of run b .*run this again once they are done"):
                with using_model(d, exclusive=True, who="base_model[tiny-sft]"):
                    pytest.fail("rebuilt under its readers")
    assert holders(d) == []  # notes go with their holders
    with using_model(d, exclusive=True, who="base_model[tiny-sft] of run c"):
        with pytest.raises(ModelInUse, match=r"cannot read .*tiny-sft: it is being rebuilt by base_model\[tiny-sft\] "
                                             r"of run c \(rebuilding"):
            with using_model(d, exclusive=False, who="segmented_rollouts[tiny-sft]"):
                pytest.fail("read while rebuilt")
        with pytest.raises(ModelInUse, match="cannot rebuild"):
            with using_model(d, exclusive=True, who="base_model[tiny-sft] of run d"):
                pytest.fail("two rebuilds at once")
    with using_model(d, exclusive=True, who="base_model[tiny-sft] of run e"):  # free again
        pass
    assert lock_path(d).parent.parent == d.parent and not d.exists()  # the lock lies beside the directory, never in it


def test_a_dead_holders_note_is_dropped_from_the_message(tmp_path):
    d = tmp_path / "m"
    notes = lock_path(d).parent / "m.users"
    with using_model(d, exclusive=False, who="reader"):
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (notes / f"{socket.gethostname()}-{int(dead.stdout)}-0").write_text("checkpoints[m|grpo] of a killed run")
        with pytest.raises(ModelInUse) as refused:
            with using_model(d, exclusive=True, who="base_model[m]"):
                pass
        assert "killed run" not in str(refused.value) and "reader (reading" in str(refused.value)
        assert len(list(notes.iterdir())) == 1


def test_a_holder_in_another_process_excludes_and_a_killed_one_does_not(tmp_path):
    d = tmp_path / "m"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from l2t_core.model_lock import using_model
        with using_model({str(d)!r}, exclusive=False, who="checkpoints[m|grpo] of run x"):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ModelInUse, match=rf"checkpoints\[m\|grpo\] of run x \(reading, pid {holder.pid}\)"):
            with using_model(d, exclusive=True, who="base_model[m]"):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with using_model(d, exclusive=True, who="base_model[m]"):  # the kernel dropped its lock
            assert holders(d) == [f"base_model[m] (rebuilding, pid {os.getpid()})"]  # the dead one's note cleared
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_one_build_of_a_model_at_a_time_and_readers_go_on_beside_it(tmp_path):
    d = tmp_path / "models" / "s"
    with building_model(d, who="base_model[s] of run a"):
        with pytest.raises(ModelInUse, match=r"cannot build .*/s: another build of it is running \(base_model\[s\] "
                                             r"of run a \(building, pid \d+\)\); run this again once it is done"):
            with building_model(d, who="base_model[s] of run b"):
                pytest.fail("two builds at once")
        with using_model(d, exclusive=False, who="checkpoints[s|grpo]"):  # readers are not the build's business
            pass
        with using_model(d, exclusive=True, who="base_model[s] of run a"):  # nor its own swap
            pass
    with building_model(d, who="base_model[s] of run b"):
        pass

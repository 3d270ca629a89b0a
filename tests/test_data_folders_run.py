"""A run on a folder data set: two processes share one listing and stop alike on a bad
folder; a resume on changed files is refused."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import free_port, run_together, subprocess_env
from tiny_images import CLASSES, write_folder

REPO = Path(__file__).parent.parent
ENTRY = REPO / "experiments" / "imagenet_resnet50.py"
FLAGS = ["--data", "folder", "--model", "resnet8", "--image-size", "16", "--batch-size", "8",
         "--bn-group-size", "4", "--eval-batch-size", "8", "--dtype", "float32",
         "--warmup-epochs", "0", "--decay-epochs", "", "--log-every-steps", "1",
         "--max-bad-fraction", "0.1", "--decode-workers", "0", "--decode-threads", "1"]


def _two_processes(tmp_path, data_dir, timeout=300):
    port = free_port()
    commands = [[sys.executable, str(ENTRY), "--workdir", str(tmp_path / "run"), *FLAGS,
                 "--data-dir", str(data_dir), "--num-steps", "2",
                 "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(i), "--heartbeat-timeout", "30",
                 "--shutdown-timeout", "10"] for i in range(2)]
    return run_together(commands, [subprocess_env(1)] * 2, tmp_path, timeout=timeout)


@pytest.mark.slow
def test_two_processes_train_on_one_folder_listing(tmp_path):
    data = write_folder(tmp_path / "data")
    statuses, outputs = _two_processes(tmp_path, data)
    assert statuses == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "read from its folders (no TensorFlow)" in outputs[0]
    index = tmp_path / "run" / "data_index"
    assert sorted(os.listdir(index)) == ["folder_index_train.bin",
                                         "folder_index_validation.bin"]


@pytest.mark.slow
def test_a_folder_without_classes_stops_every_process_with_the_same_line(tmp_path):
    data = tmp_path / "data"
    os.makedirs(data / "train")
    os.makedirs(data / "val")
    statuses, outputs = _two_processes(tmp_path, data, timeout=180)
    expected = f"{data / 'train'} holds no class folders"
    for status, out in zip(statuses, outputs):
        assert status == 2, out[-3000:]
        errors = [line for line in out.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0], out[-3000:]
        assert "Traceback" not in out and "compiling" not in out
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_a_resume_on_changed_files_is_refused_and_a_moved_copy_resumes(tmp_path):
    data = write_folder(tmp_path / "data")
    workdir = tmp_path / "run"

    def train(data_dir, steps):
        return subprocess.run([sys.executable, str(ENTRY), "--workdir", str(workdir), *FLAGS,
                               "--data-dir", str(data_dir), "--num-steps", str(steps),
                               "--cpu-devices", "2", "--checkpoint-every-steps", "2"],
                              env=subprocess_env(2), capture_output=True, text=True, timeout=300)

    first = train(data, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    moved = shutil.move(data, tmp_path / "moved")
    resumed = train(moved, 3)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    shutil.copy(Path(moved) / "train" / CLASSES[1] / "img_01.jpg",
                Path(moved) / "train" / CLASSES[1] / "img_99.jpg")
    again = train(moved, 4)
    assert again.returncode == 2, again.stderr[-3000:]
    last = again.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot resume") and "train split had 40 examples" in last
    assert "has 41, fingerprint" in last

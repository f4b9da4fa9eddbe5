"""Without the models extra (torch and friends), st2he still reads, rasterises, evaluates and plots."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_reading_rasterising_and_evaluating_need_no_torch(tmp_path):
    script = textwrap.dedent(
        """
        import importlib.abc, sys, warnings

        BLOCKED = ("torch", "torchvision", "diffusers", "peft", "transformers", "open_clip", "safetensors")

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"No module named {name!r} (blocked by the test)")
                return None

        sys.meta_path.insert(0, Block())
        import importlib.util
        real_find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name.split(".")[0] in BLOCKED else real_find_spec(name, *a)

        import matplotlib
        matplotlib.use("Agg")
        import st2he

        sdata = st2he.datasets.synthetic_tissue(0, size_um=64)
        st2he.pp.rasterize_transcripts(sdata)
        st2he.tl.virtual_he(sdata, method="stain")
        df = st2he.tl.evaluate_he(sdata, pred_key="virtual_he", true_key="he_image")
        assert 10 < df.loc["overall", "psnr"] < 40, df.loc["overall"]
        st2he.pl.compare(sdata, genes=[])
        assert not any(m.split(".")[0] in BLOCKED for m in sys.modules), [m for m in sys.modules if "torch" in m]
        try:
            st2he.models
        except ImportError as err:
            assert "pip install 'st2he[models]'" in str(err), err
        else:
            raise AssertionError("st2he.models imported without torch")
        print("OK")
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stderr[-3000:]

"""What no fused_bn wheel may do: pull in a second TensorFlow distribution.

`tensorflow`, `tensorflow-cpu` (and the nightlies) all install the same
`tensorflow/` package, so a requirement on one of them, in an environment
that has another, makes pip install both, and the last one wins file by file.
Shared by tests/test_packaging.py (the metadata setup.py writes) and
scripts/test_wheel.sh (a built wheel, and pip's resolver on it).
"""
import email.parser
import re

from packaging.requirements import Requirement

TF_DISTS = frozenset({
    "tensorflow", "tensorflow-cpu", "tensorflow-gpu", "tensorflow-intel",
    "tensorflow-cpu-aws", "tensorflow-aarch64", "tensorflow-macos",
    "tensorflow-rocm", "tf-nightly", "tf-nightly-cpu", "tf-nightly-gpu",
})


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def tensorflow_requirements(metadata_text, extra=None):
    """The TensorFlow requirements of a METADATA file for `pip install
    fused_bn[extra]` (extra=None: a plain install)."""
    msg = email.parser.Parser().parsestr(metadata_text)
    reqs = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
    env = {"extra": extra or ""}
    return [r for r in reqs if canonical(r.name) in TF_DISTS
            and (r.marker is None or r.marker.evaluate(env))]


def check_metadata(metadata_text, tf_minor):
    """Asserts the scheme: no TensorFlow without an extra; [cpu] and
    [and-cuda] name exactly one distribution each, of minor `tf_minor`."""
    def summary(extra):
        return [(canonical(r.name), sorted(r.extras), str(r.specifier))
                for r in tensorflow_requirements(metadata_text, extra)]

    assert summary(None) == [], summary(None)
    assert summary("cpu") == [("tensorflow-cpu", [], f"=={tf_minor}.*")], summary("cpu")
    assert summary("and-cuda") == [("tensorflow", ["and-cuda"], f"=={tf_minor}.*")], \
        summary("and-cuda")
    msg = email.parser.Parser().parsestr(metadata_text)
    for extra in set(msg.get_all("Provides-Extra") or []) - {"cpu", "and-cuda"}:
        assert summary(extra) == [], (extra, summary(extra))


def tensorflow_installs(pip_report):
    """TensorFlow distributions a `pip install --dry-run --report` would install."""
    return sorted(canonical(i["metadata"]["name"]) for i in pip_report["install"]
                  if canonical(i["metadata"]["name"]) in TF_DISTS)

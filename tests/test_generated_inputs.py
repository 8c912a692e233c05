"""Generated inputs (Hypothesis): job configs, YAML documents and ``--set`` pairs, valid or not.

Every input is refused with exactly one ConfigError line that names a key or the
file, or accepted; no other exception escapes, and no valid config is refused.
In-process and without Ray, so hundreds of cases take seconds. Each test also
counts the distinct inputs it refused, so a generator that stopped producing bad
ones would fail here rather than pass quietly.
"""

import dataclasses
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raytopk.cli import parse_sets
from raytopk.config import ConfigError, TrainConfig, load_config

KEYS = [f.name for f in dataclasses.fields(TrainConfig)]
# Derandomized: every CI run tries the same inputs, so a failure there reproduces exactly here.
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=True
)

# Anything YAML can hold: numbers of every kind (NaN, inf, huge), text, unicode, nesting.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["sgd", "adamw", "fp16", "bf16", "auto", "sharded", "mnist5k", "simple_cnn", "vit", "../x", ".x"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# Keys mostly real, sometimes not (a typo, another type).
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=12))


def _refused_in_one_line(err: ConfigError) -> str:
    message = str(err)
    assert message and "\n" not in message, repr(message)
    return message


def _check(make, refused: set, item) -> None:
    """``make()`` gives a TrainConfig or one ConfigError line; ``refused`` collects ``item`` when refused."""
    try:
        cfg = make()
    except ConfigError as err:
        _refused_in_one_line(err)
        refused.add(repr(item))
    else:
        assert isinstance(cfg, TrainConfig)


def test_generated_job_configs_are_accepted_or_refused_in_one_line():
    refused = set()

    @SETTINGS
    @given(st.dictionaries(keys, values, max_size=6))
    def one(job):
        _check(lambda: load_config(None, **job), refused, job)

    one()
    assert len(refused) >= 100, len(refused)


def test_generated_yaml_documents_are_accepted_or_refused_in_one_line(tmp_path):
    refused = set()
    path = tmp_path / "job.yaml"
    documents = st.one_of(
        st.dictionaries(keys, values, max_size=5).map(lambda d: yaml.safe_dump(d, allow_unicode=True)),
        values.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),  # lists, scalars: not a mapping
        st.text(max_size=60),  # anything at all
        st.integers(1, 700).map(
            lambda depth: "[" * depth + "]" * depth
        ),  # deep nesting: from about 500 levels the parser's RecursionError
        st.sampled_from(
            [
                "epochs: 1e999",
                "ratio: .nan",
                "lr: -.inf",
                "batch_size: 99999999999999999999999",
                "model: !!python/object/apply:os.system [echo hi]",
                "ratio: !custom 1",
                "? [a, b]\n: 1",
                "epochs: &a 1\nlr: *a",
                "name: \u00e9t\u00e9",
                "\ufeffepochs: 2",
                "a: b: c",
                "epochs: [1, 2",
            ]
        ),
        st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
    )

    @SETTINGS
    @given(documents)
    def one(document):
        path.write_text(document, encoding="utf-8", errors="surrogatepass")
        _check(lambda: load_config(str(path)), refused, document)

    one()
    assert len(refused) >= 100, len(refused)


@pytest.mark.parametrize("depth", [1000, 3000])
def test_nesting_deeper_than_the_parser_recurses_is_refused_in_one_line(depth, tmp_path):
    """The generated inputs above stop at 700 levels (deeper ones cost the parser seconds each); these go further."""
    nested = "[" * depth + "]" * depth
    path = tmp_path / "job.yaml"
    path.write_text(nested)
    for make in (lambda: load_config(str(path)), lambda: load_config(None, **parse_sets([f"model={nested}"]))):
        with pytest.raises(ConfigError, match="nested too deeply") as refused:
            make()
        _refused_in_one_line(refused.value)


def test_generated_set_pairs_are_accepted_or_refused_in_one_line():
    refused = set()
    pairs = st.lists(
        st.one_of(
            st.tuples(st.sampled_from(KEYS), st.text(max_size=15)).map("=".join),
            st.tuples(
                st.sampled_from(KEYS), values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
            ).map("=".join),
            st.text(max_size=20),  # no '=' at all, or an empty key
            st.tuples(st.sampled_from(KEYS), st.integers(1, 700)).map(lambda kd: f"{kd[0]}={'[' * kd[1]}{']' * kd[1]}"),
        ),
        min_size=1,
        max_size=4,
    )

    @SETTINGS
    @given(pairs)
    def one(given_pairs):
        _check(lambda: load_config(None, **parse_sets(given_pairs)), refused, given_pairs)

    one()
    assert len(refused) >= 100, len(refused)


@st.composite
def valid_jobs(draw):
    """Configs inside every documented bound, consistent with each other (batch and accumulation fit mnist5k's
    shard)."""
    workers = draw(st.integers(1, 4))
    shard = math.ceil(4000 / workers)
    batch_size = draw(st.integers(1, shard))
    epochs = draw(st.integers(1, 50))
    job = {
        "workers": workers,
        "batch_size": batch_size,
        "epochs": epochs,
        "accumulate": draw(st.integers(1, min(8, shard // batch_size))),
        "save_every": draw(st.integers(1, epochs)),
        "ratio": draw(st.floats(1e-6, 1.0)),
        "lr": draw(st.floats(1e-6, 10.0)),
        "compress": draw(st.booleans()),
        "model": draw(st.sampled_from(["simple_cnn", "resnet18", "vit"])),
        "exchange": draw(st.sampled_from(["auto", "allgather", "sharded", "hierarchical"])),
        "value_dtype": draw(st.sampled_from(["fp32", "fp16", "bf16"])),
        "name": draw(st.none() | st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,30}", fullmatch=True)),
    }
    job["min_workers"] = draw(st.integers(0, workers))
    return job


@SETTINGS
@given(valid_jobs())
def test_no_valid_job_is_refused(job):
    cfg = load_config(None, **job)
    assert all(getattr(cfg, key) == value for key, value in job.items() if value is not None)

"""The engine's batch-filled histograms expose what prometheus_client's own Histogram would."""

import math

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram

from jint8.serve.metrics import BatchHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
_VALUES = st.floats(min_value=0.0, max_value=5.0, allow_nan=False)


@settings(deadline=None, max_examples=50)
@given(calls=st.lists(st.lists(_VALUES | st.sampled_from(BUCKETS), max_size=20), max_size=6))
def test_batch_histogram_samples_equal_prometheus_histogram_samples(calls):
    """Values on a bucket's bound count in that bucket (le), calls of any size, empty included."""
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("latency_seconds", "doc", BUCKETS, ours_registry)
    theirs = Histogram("latency_seconds", "doc", buckets=BUCKETS, registry=theirs_registry)
    for values in calls:
        ours.observe_many(values)
        for value in values:
            theirs.observe(value)
    for suffix, labels in [("_count", {}), ("_sum", {})] + [("_bucket", {"le": le})
                                                            for le in ("0.001", "0.01", "0.1", "1.0", "+Inf")]:
        mine = ours_registry.get_sample_value("latency_seconds" + suffix, labels)
        expected = theirs_registry.get_sample_value("latency_seconds" + suffix, labels)
        assert math.isclose(mine, expected, rel_tol=1e-12, abs_tol=1e-12), (suffix, labels, mine, expected)

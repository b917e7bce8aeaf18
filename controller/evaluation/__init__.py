"""Offline evaluation of the controller's detectors on public benchmarks (NAB)."""

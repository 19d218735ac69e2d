"""Test-only companions of bpfilter, never imported by it nor frozen into bpfilter.ko's
helper: the namespace lab for differential tests (lab, packets, backends), blobs made by
the kernel from ruleset text (scratch) and the demo (`python3 -m bpfilter_lab demo`)."""

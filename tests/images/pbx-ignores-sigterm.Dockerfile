# An IM with no SIGTERM handler: as PID 1 it ignores SIGTERM, so only the
# kill at the end of the stop grace period ends it.
FROM imfleet-test/pbx:22
ENV FAKE_IM_SIGTERM=ignore

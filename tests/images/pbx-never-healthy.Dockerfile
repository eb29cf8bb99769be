# An IM whose /svr_stats never reports healthy: for failed-deploy tests.
FROM imfleet-test/pbx:22
ENV FAKE_IM_HEALTH=never

# The next version of the stand-in, for upgrade tests: same programs, its
# own version in /svr_stats and VERSION.
FROM imfleet-test/pbx:22
ENV FAKE_IM_VERSION=23.0.0-fake
LABEL version="23"

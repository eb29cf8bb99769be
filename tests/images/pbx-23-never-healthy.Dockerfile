# A next version that never becomes healthy: upgrades of it must roll back.
FROM imfleet-test/pbx:23
ENV FAKE_IM_HEALTH=never

# An IM that exits with an error as soon as it starts: restart unless-stopped
# turns that into a crash loop.
FROM imfleet-test/pbx:22
ENV FAKE_IM_CRASH=start

# Test stand-in for portsip/pbx:22: the IM programs, same paths and arguments.
# The image's own health check is what the web server container gets (the
# IM's container overrides it with /svr_stats, as im_ctl.sh does).
FROM scratch
COPY portsip-fake /usr/local/bin/im
COPY portsip-fake /usr/local/bin/initdt.sh
COPY portsip-fake /usr/local/bin/run_im_websrv.sh
COPY portsip-fake /usr/bin/curl
ENV PATH=/usr/local/bin:/usr/bin
HEALTHCHECK --interval=3s --timeout=3s --retries=10 CMD ["curl", "-fsS", "http://localhost:8903/healthz"]
LABEL version="22" org.opencontainers.image.title="imfleet test stand-in for portsip/pbx"

# Test stand-in for portsip/pbx:22: the IM programs, same paths and arguments.
FROM scratch
COPY portsip-fake /usr/local/bin/im
COPY portsip-fake /usr/local/bin/initdt.sh
COPY portsip-fake /usr/local/bin/run_im_websrv.sh
COPY portsip-fake /usr/bin/curl
ENV PATH=/usr/local/bin:/usr/bin
LABEL version="22" org.opencontainers.image.title="imfleet test stand-in for portsip/pbx"

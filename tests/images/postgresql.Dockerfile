# Test stand-in for portsip/postgresql:14.12: listens on 5432, has pg_isready.
FROM scratch
COPY portsip-fake /usr/local/bin/postgres
COPY portsip-fake /usr/bin/pg_isready
ENV PATH=/usr/local/bin:/usr/bin PGDATA=/var/lib/postgresql/data
ENTRYPOINT ["/usr/local/bin/postgres"]
LABEL version="14.12" org.opencontainers.image.title="imfleet test stand-in for portsip/postgresql"

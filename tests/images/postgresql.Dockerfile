# Test stand-in for portsip/postgresql:14.12: runs as postgres (999), refuses
# root, a PGDATA it does not own or that others can read, and a first start
# without POSTGRES_PASSWORD; listens on 5432, has pg_isready.
FROM scratch
COPY portsip-fake /usr/local/bin/postgres
COPY portsip-fake /usr/bin/pg_isready
ENV PATH=/usr/local/bin:/usr/bin PGDATA=/var/lib/postgresql/data
USER 999:999
ENTRYPOINT ["/usr/local/bin/postgres"]
LABEL version="14.12" org.opencontainers.image.title="imfleet test stand-in for portsip/postgresql"

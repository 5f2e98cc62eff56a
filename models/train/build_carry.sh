#!/usr/bin/env bash
# Build the carried shards of the training corpus on a machine that reaches the Debian, npm and
# PyPI registries: the non-Python shards, plus extra Python from PyPI wheels that are neither
# installed on the GPU box nor held out; the result (.work/carry/shards/*.jsonl.xz) is carried
# to the GPU box. Run from the repository root: bash models/train/build_carry.sh
# (needs apt-get, dpkg, npm, pip, unzip)
set -euo pipefail
WORK=${WORK:-.work}
OUT=$WORK/carry/shards
mkdir -p "$WORK/debs" "$WORK/src" "$WORK/npm" "$WORK/pypi/wheels" "$WORK/pypi/site" "$OUT"
CORPUS="python3 -m models.train.corpus"

DEBS="golang-1.19-src rust-src openjdk-17-source glibc-source linux-source-6.1 libc6-dev
      libabsl-dev libgtest-dev libboost1.81-dev libeigen3-dev libstdc++-12-dev"
(cd "$WORK/debs" && apt-get download $DEBS)
for deb in "$WORK"/debs/*.deb; do
  dir="$WORK/src/$(basename "$deb" .deb)"
  [ -d "$dir" ] || { mkdir -p "$dir" && dpkg -x "$deb" "$dir"; }
done
NPM="react react-dom vue @vue/runtime-core @vue/reactivity @vue/compiler-core typescript rxjs
     three d3-array d3-scale d3-shape d3-selection jquery @types/node @types/react eslint webpack
     preact redux @reduxjs/toolkit immer zod date-fns mobx svelte @angular/core ramda underscore
     vitest prettier @babel/parser acorn esprima marked highlight.js socket.io ws graphql uuid semver"
(cd "$WORK/npm" && ls ./*.tgz >/dev/null 2>&1 || npm pack $NPM >/dev/null)
# Python beyond the GPU box's own site-packages (its list: .work/h200/python_manifest.json);
# none of shared/HOLDOUT.md, nor anything named after it (corpus.py drops those anyway).
PYPI="requests-toolbelt requests-oauthlib oauthlib httplib2 websocket-client websockets
      requests-cache cachecontrol requests-futures responses respx h2 hpack hyperframe wsproto
      sniffio trio trio-websocket outcome python-socketio python-engineio simple-websocket
      aiosmtplib redis kafka-python pika aio-pika aiormq pamqp nats-py paho-mqtt zeep tenacity
      backoff retrying furl hyperlink rfc3986 uritemplate tldextract validators email-validator
      dnspython fire cleo argcomplete plumbum cliff cmd2 prompt-toolkit questionary blessed urwid
      asciimatics textual colorlog coloredlogs termcolor prettytable texttable halo alive-progress
      progressbar2 yaspin loguru structlog python-json-logger humanfriendly wcwidth lark ply
      parsimonious antlr4-python3-runtime textx arpeggio tatsu sqlparse sqlglot mistune markdown2
      commonmark mistletoe marko beautifulsoup4 soupsieve html5lib webencodings bleach cssselect
      tinycss2 cssutils feedparser xmltodict defusedxml python-docx openpyxl xlrd xlwt xlsxwriter
      python-pptx pypdf pdfminer.six fpdf2 toml tomli tomli-w ruamel.yaml json5 jsonpointer
      jsonpatch jsonschema referencing fastjsonschema ijson jmespath jsonpath-ng python-dotenv
      configobj dynaconf hydra-core omegaconf dateparser parsedatetime python-slugify pytz tzlocal
      isodate iso8601 croniter polars petl tablib agate csvkit pandera frictionless cattrs
      dataclasses-json dacite pyrsistent more-itertools boltons funcy returns pydash glom deepdiff
      dictdiffer addict python-box munch bidict cachetools diskcache dogpile.cache mock freezegun
      faker factory-boy pytest-asyncio pytest-randomly pytest-html pytest-rerunfailures tox nox
      behave robotframework selenium parameterized testfixtures pyhamcrest vcrpy requests-mock
      locust syrupy pytest-bdd pytest-httpserver aiosqlite aiomysql databases asgiref uvicorn
      hypercorn gunicorn waitress eventlet async-timeout aiocache aiodns janus aiostream
      asyncstdlib sanic falcon pyramid webob cherrypy peewee pony tortoise-orm mongoengine pymongo
      motor elasticsearch opensearch-py neo4j psycopg pymysql pg8000 alembic mako chameleon genshi
      pystache chevron cryptography pyopenssl pynacl passlib pycryptodome rsa pyasn1
      pyasn1-modules ecdsa python-jose pyjwt authlib itsdangerous keyring secretstorage jeepney
      truststore google-cloud-storage google-api-core google-auth google-cloud-bigquery
      google-cloud-pubsub google-resumable-media azure-core azure-identity azure-storage-blob msal
      openstacksdk docker hvac dropbox slack-sdk twilio sendgrid openai pre-commit virtualenv pipx
      pip-tools hatchling flit-core setuptools-scm twine readme-renderer pkginfo distlib
      platformdirs importlib-metadata importlib-resources watchdog sh pexpect ptyprocess autopep8
      yapf pyupgrade autoflake bandit radon mccabe vulture pydocstyle rope astor asttokens
      executing stack-data pure-eval ipython traitlets jupyter-core jupyter-client nbformat
      nbconvert ipykernel decorator typeguard beartype pycparser gast pint uncertainties nltk
      rdflib geopy folium branca plotly altair pydot graphviz pulp deap simpy mesa emcee lmfit
      mido music21 pydub qrcode svgwrite pyglet keras optuna hyperopt mlflow-skinny wandb
      gymnasium datasets evaluate diffusers langchain-core bokeh panel param holoviews dask
      distributed partd locket zict tblib s3fs gcsfs adlfs nbclient jupyter-server notebook
      jupyterlab-server ipywidgets pandocfilters tinydb zodb persistent transaction btrees
      sqlite-utils apscheduler schedule rq huey dramatiq arq prefect luigi jsonpickle dill pyhocon
      configargparse environs python-decouple pyee blinker zope.interface pyzmq gitpython gitdb
      smmap dulwich scp sshtunnel asyncssh pyserial pyusb bleak pymodbus netaddr scapy impacket
      pysnmp ldap3 requests-kerberos pyspnego ntlm-auth smbprotocol pywinrm xlsx2csv chardet ftfy
      emoji inflect inflection num2words babel python-i18n polib translate-toolkit pyexcel
      pyexcel-io pyexcel-xlsx thrift avro fastavro pyorc docstring-parser mkdocs mkdocs-material
      mkdocstrings pdoc pydoc-markdown cookiecutter copier binaryornot python-magic filetype
      puremagic schema voluptuous cerberus trafaret colander deform pyvis zarr numcodecs h5netcdf
      netcdf4 pyshp geojson mercantile tweepy praw python-telegram-bot discord.py pygithub
      python-gitlab jira atlassian-python-api notion-client hvplot"
ls "$WORK"/pypi/wheels/*.whl >/dev/null 2>&1 || for p in $PYPI; do
  pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$WORK/pypi/wheels" "$p" \
    || echo "pypi: no wheel for $p, skipped" >&2
done
for whl in "$WORK"/pypi/wheels/*.whl; do unzip -qo "$whl" -d "$WORK/pypi/site"; done

S=$WORK/src
XZ="--compression xz --out $OUT"
$CORPUS files $XZ --prefix go --root "$(echo $S/golang-1.19-src_*/usr/share/go-1.19/src)" \
  --name golang-1.19-src --version 1.19.8 --path-prefix src/ --exclude testdata \
  --keep-fraction 0.8 --max-bytes 30000000
$CORPUS files $XZ --prefix rust --root "$(echo $S/rust-src_*/usr/src/rustc-*)" \
  --name rust-src --version 1.63.0 --include library/ compiler/ src/librustdoc/ \
  --exclude vendor tests --max-bytes 25000000
$CORPUS files $XZ --prefix java --root "$(echo $S/openjdk-17-source_*/usr/lib/jvm/openjdk-17/lib/src.zip)" \
  --name openjdk-17-source --version 17.0.21 --keep-fraction 0.25 --max-bytes 30000000
$CORPUS files $XZ --prefix c-linux --root "$(echo $S/linux-source-6.1_*/usr/src/linux-source-6.1.tar.xz)" \
  --name linux-source-6.1 --version 6.1 --keep-fraction 0.5 --max-bytes 25000000 \
  --include linux-source-6.1/kernel/ linux-source-6.1/mm/ linux-source-6.1/fs/ linux-source-6.1/lib/ \
  linux-source-6.1/net/core/ linux-source-6.1/net/ipv4/ linux-source-6.1/block/ linux-source-6.1/ipc/ \
  linux-source-6.1/crypto/ linux-source-6.1/init/ linux-source-6.1/include/linux/ linux-source-6.1/drivers/base/
$CORPUS files $XZ --prefix c-glibc --root "$(echo $S/glibc-source_*/usr/src/glibc/glibc-*.tar.xz)" \
  --name glibc-source --version 2.36 --max-bytes 8000000 --keep-fraction 0.5
$CORPUS files $XZ --prefix c-libc6-dev --root "$(echo $S/libc6-dev_*/usr/include)" \
  --name libc6-dev --version 2.36 --path-prefix include/
$CORPUS files $XZ --prefix cpp-boost --root "$(echo $S/libboost1.81-dev_*/usr/include)" \
  --name libboost1.81-dev --version 1.81.0 --lang cpp --keep-fraction 0.08 --max-bytes 8000000
for pkg in libabsl-dev libgtest-dev libeigen3-dev libstdc++-12-dev; do
  $CORPUS files $XZ --prefix "cpp-$pkg" --root "$(echo $S/${pkg}_*/usr)" --name "$pkg" --lang cpp \
    --max-bytes 3000000
done
$CORPUS npm $XZ --prefix npm --tgz "$WORK"/npm/*.tgz --max-bytes 30000000 --max-source-bytes 3000000
$CORPUS python $XZ --prefix python-pypi --no-stdlib --site-packages "$WORK/pypi/site" \
  --max-source-bytes 4000000 --max-bytes 262000000
$CORPUS manifest "$OUT"
du -sh "$OUT"

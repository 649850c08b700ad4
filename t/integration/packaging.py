#!/usr/bin/env python3
"""The one list of Debian packages (t/lib/packages.txt) and what depends on
it cannot drift apart: debian/control's Build-Depends are exactly its
`build` rows and its `check` rows (these with <!nocheck>), every package
that configure.ac tells a user to install is in it, and every role is one
that t/lib/deps.sh knows. The build and install themselves are checked on a
fresh root by t/fresh.sh."""

import os
import re
import sys

sys.path.insert(0, os.path.join(os.environ.get('top_srcdir', '.'), 't', 'lib'))
import harness as h  # noqa: E402

ROLES = {'tool', 'build', 'check', 'pack', 'demo', 'test'}


def package_list(path):
    rows = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith('#'):
                continue
            fields = line.split()
            if len(fields) != 2 or fields[1] not in ROLES:
                raise AssertionError('%s:%d: want "package role", role one of %s'
                                     % (path, n, sorted(ROLES)))
            if fields[0] in rows:
                raise AssertionError('%s:%d: %s twice' % (path, n, fields[0]))
            rows[fields[0]] = fields[1]
    return rows


def build_depends(path):
    """{package: restriction or ''} from the source stanza of debian/control."""
    text = open(path).read()
    m = re.search(r'^Build-Depends:(.*?)(?=^\S)', text, re.M | re.S)
    h.check(m is not None, 'debian/control has Build-Depends')
    deps = {}
    for item in m.group(1).split(','):
        item = item.strip()
        if not item:
            continue
        dm = re.match(r'^([a-z0-9][a-z0-9+.-]*)\s*(\([^)]*\))?\s*(<[^>]*>)?$', item)
        if dm is None:
            raise AssertionError('unparsed Build-Depends item %r' % item)
        deps[dm.group(1)] = dm.group(3) or ''
    return deps


def main(workdir):
    top = os.environ.get('top_srcdir') or h.REPO
    rows = package_list(os.path.join(top, 't', 'lib', 'packages.txt'))
    deps = build_depends(os.path.join(top, 'debian', 'control'))
    deps.pop('debhelper-compat', None)

    want = {p: ('<!nocheck>' if r == 'check' else '') for p, r in rows.items()
            if r in ('build', 'check')}
    h.check(sorted(deps) == sorted(want),
            'Build-Depends are the build and check rows of t/lib/packages.txt',
            'only in debian/control: %s; only in packages.txt: %s'
            % (sorted(set(deps) - set(want)), sorted(set(want) - set(deps))))
    wrong = {p: deps[p] for p in deps if deps[p] != want[p]}
    h.check(not wrong, 'the check rows, and only they, are <!nocheck>', wrong)

    configure = open(os.path.join(top, 'configure.ac')).read()
    named = set(re.findall(r'apt-get install ([a-z0-9][a-z0-9+.-]*)', configure)) | \
        set(re.findall(r'SAGAD_REQUIRE\(\[\w+\], \[[^]]*\], \[([a-z0-9+.-]+)\]\)', configure))
    h.check(named and named <= set(want),
            'every package configure.ac names (%d) is a build or check row' % len(named),
            sorted(named - set(want)))

    deps_sh = open(os.path.join(top, 't', 'lib', 'deps.sh')).read()
    used = set(w for w in ' '.join(re.findall(r'roles="([^"]*)"', deps_sh)).split()
               if not w.startswith('$'))
    h.check(used == ROLES, 'deps.sh installs every role of the list', sorted(ROLES ^ used))


if __name__ == '__main__':
    h.run_test(main)

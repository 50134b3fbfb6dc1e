"""The method document is in the repository and every citation points at it.

The code and tests cite `docs/<file>.md` and sections of docs/introvae.md
('docs/introvae.md, section 3c', 'sections 2-4', 'introvae.md 3b'); each
cited file must exist and each cited section must be a heading '## <id>.'
of docs/introvae.md. Before this test the citations pointed at a document
outside the repository.
"""

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ('introvae_jax/**/*.py', 'tests/*.py', 'bench/*.py', 'configs/*.py',
           'main.py', 'README.md', 'docs/*.md')
DOC_PATH = re.compile(r'docs/([\w/-]+\.md)')
SECTION = re.compile(
    r'introvae\.md,?\s+(?:sections?\s+)?(\d+[a-z]?)(?:\s*-\s*(\d+[a-z]?))?')
HEADING = re.compile(r'^## (\d+[a-z]?)\. ', re.M)


def _sources():
  for pattern in SOURCES:
    for path in sorted(glob.glob(os.path.join(REPO, pattern), recursive=True)):
      with open(path, encoding='utf-8') as f:
        yield os.path.relpath(path, REPO), f.read()


def _sections():
  with open(os.path.join(REPO, 'docs', 'introvae.md'), encoding='utf-8') as f:
    return HEADING.findall(f.read())


def test_every_cited_document_exists():
  missing = [(where, m) for where, text in _sources()
             for m in DOC_PATH.findall(text)
             if not os.path.exists(os.path.join(REPO, 'docs', m))]
  assert not missing, missing


def test_every_cited_section_of_the_method_document_exists():
  sections = _sections()
  assert {'1', '3', '3b', '3c', '5', '8'} <= set(sections)
  cited, missing = 0, []
  for where, text in _sources():
    if where == 'docs/introvae.md':
      continue
    for first, last in SECTION.findall(text.replace('\n', ' ')):
      cited += 1
      missing += [(where, s) for s in (first, last) if s and s not in sections]
  assert cited >= 8, cited
  assert not missing, missing


def test_the_objectives_cite_their_authors_code_by_line():
  """Each objective module names its source file and commit, and cites line
  numbers for its terms."""
  for name, source in (('introvae', 'hhb072/IntroVAE'),
                       ('soft_introvae', 'b6dbf16')):
    with open(os.path.join(REPO, 'introvae_jax', 'objectives', f'{name}.py'),
              encoding='utf-8') as f:
      text = f.read()
    assert source in text, name
  with open(os.path.join(REPO, 'introvae_jax', 'objectives',
                         'soft_introvae.py'), encoding='utf-8') as f:
    assert len(re.findall(r'l\. \d+', f.read())) >= 6

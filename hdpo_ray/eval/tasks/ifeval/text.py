"""Counting words and sentences and detecting the language, as IFEval's instructions_util does, offline.

The official code counts words with `\\w+` (no data needed), counts sentences with NLTK's English punkt
model (`nltk.data.load("tokenizers/punkt/english.pickle")`), tokenises words for the capital-word count
with `nltk.word_tokenize` (which runs that same punkt model first), and detects languages with
`langdetect`. The punkt model is a separate download that is not available here, so `split_sentences`
runs NLTK's own punkt algorithm (`PunktSentenceTokenizer`, shipped in the nltk wheel) with parameters
written here instead of the trained ones:

- ABBREVIATIONS: the common English abbreviations that the English model also knows (titles, months,
  weekdays, company suffixes, "u.s", "a.m", "ph.d", ...). Like the English model, it does NOT list
  "e.g", "i.e" or "etc", so "e.g. the" ends a sentence, as it does in the official count.
- SENTENCE_STARTERS: common words that, capitalised after an abbreviation or an ellipsis, start a new
  sentence. They stand in for the model's orthographic table (how each word of its training text was
  capitalised where), which is not reproduced.

Where the count may differ from the official one: only after a token ending in "." that is an
abbreviation, an ellipsis or an initial, followed by a capitalised word outside SENTENCE_STARTERS
("...at 5 p.m. Afterwards", "a. First option"): the English model may start a new sentence there (when
it saw the word mostly lowercase), this one does not; and after an abbreviation the model knows but
ABBREVIATIONS lacks (US states such as "Ariz."). Endings at . ? ! followed by a space, numbered
list markers ("1. Intro" ends a sentence after "1."), and lines without end punctuation (a title runs
into the next sentence: punkt does not split at newlines) are decided as by the model. On the 541
GPT-4 responses shipped with IFEval, these parameters and NLTK's untrained punkt (no abbreviations)
give the same verdict for every number_sentences and capital_word_frequency instruction.

langdetect is randomised; the official code does not seed it, so its verdicts can flip between runs on
short or mixed-language texts. Here `DetectorFactory.seed = 0` makes every verdict reproducible.
"""

from __future__ import annotations

import re
from functools import lru_cache


def _words(*groups: str) -> frozenset[str]:
    return frozenset(word for group in groups for word in group.split())


ABBREVIATIONS = _words(
    "mr mrs ms messrs dr prof jr sr st gen col lt maj adm sen rep gov sgt",  # titles and ranks
    "inc ltd co corp bros cie ave ft",  # companies and addresses
    "jan feb aug sep sept oct nov dec tues wed fri",  # not "mar", "may", "sun", "sat": they are words too
    "u.s u.s.a u.k u.n u.s.s.r d.c n.y calif fla ph.d m.b.a a.m p.m vs",  # places, degrees, times, "versus"
    "c d e f g h k l m n p r s t v w",  # single-letter initials, as the English model lists them
)
# Common words that are never capitalised mid-sentence: after an abbreviation or an ellipsis, a capitalised one
# starts a new sentence. The English model decides this from its orthographic table; this list stands in for that
# table for the words where it matters most ("Wait... What now?" is two sentences, "Dr. Smith" one).
SENTENCE_STARTERS = _words(
    "the a an this that these those it its he she they we i you my our your his her their there here",
    "what why how where who which when while if since as because although though unless",
    "but and or so yet nor however moreover meanwhile thus therefore instead indeed nevertheless similarly",
    "in on at for from with after before during despite then now today finally first next also",
    "no not yes one each every all some many most both",
)


@lru_cache(maxsize=1)
def _sentence_tokenizer():
    # Imported here: nltk's package import takes about a second and only two checkers need it.
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    params = PunktParameters()
    params.abbrev_types = set(ABBREVIATIONS)
    params.sent_starters = set(SENTENCE_STARTERS)
    return PunktSentenceTokenizer(params)


@lru_cache(maxsize=1)
def _word_tokenizer():
    from nltk.tokenize.destructive import NLTKWordTokenizer  # what nltk.word_tokenize uses within each sentence

    return NLTKWordTokenizer()


def split_sentences(text: str) -> list[str]:
    """The sentences of `text` by the punkt algorithm (see the module docstring for the parameters)."""
    return _sentence_tokenizer().tokenize(text)


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


def count_words(text: str) -> int:
    """Runs of word characters, as the official `RegexpTokenizer(r"\\w+")`: "don't" is two words, "e-mail" two."""
    return len(re.findall(r"\w+", text))


def word_tokenize(text: str) -> list[str]:
    """`nltk.word_tokenize`: punkt sentences, then the Treebank-style word tokenizer on
    each ("DON'T" -> "DO", "N'T")."""
    tokenizer = _word_tokenizer()
    return [token for sentence in split_sentences(text) for token in tokenizer.tokenize(sentence)]


@lru_cache(maxsize=1)
def _seeded_langdetect():
    import langdetect

    langdetect.DetectorFactory.seed = 0  # reproducible verdicts; the official run is unseeded
    return langdetect


def detect_language(text: str) -> str | None:
    """langdetect's ISO 639-1 code for `text` ("en", "de", "zh-cn"); None when it finds no features to judge by."""
    langdetect = _seeded_langdetect()
    try:
        return langdetect.detect(text)
    except langdetect.LangDetectException:
        return None

"""Seeded synthetic sensitive text: fake clinical notes and bank messages.

Each record mimics a private document (a name, dates, amounts, a diagnosis)
and is generated locally with ``faker`` (locale ``en_US``) from one seed: the
names, companies and phone numbers come from a ``Faker`` instance seeded with
``seed_instance`` (never the class-wide ``Faker.seed``), every other choice
from that instance's own ``random.Random``. Dates are drawn in fixed ranges,
never relative to today. The output depends on the ``faker`` version, which
``pyproject.toml`` pins and :func:`generator_version` records.
"""

from __future__ import annotations

import datetime

import dpjax.data._checks as _checks

KINDS = ("clinical", "bank", "mixed")
TEMPLATE_VERSION = 1
"""Bumped whenever a template below changes (the text would change)."""
LOCALE = "en_US"

DIAGNOSES = (
    "type 2 diabetes mellitus", "essential hypertension", "community-acquired pneumonia",
    "major depressive disorder", "moderate persistent asthma", "chronic kidney disease stage 3",
    "atrial fibrillation", "migraine without aura", "hypothyroidism",
    "iron deficiency anemia", "osteoarthritis of the left knee", "generalized anxiety disorder",
    "COPD exacerbation", "acute bronchitis", "gastroesophageal reflux disease",
    "lumbar strain", "urinary tract infection", "hyperlipidemia",
)
MEDICATIONS = (
    "metformin 500 mg twice daily", "lisinopril 10 mg daily", "amoxicillin 875 mg twice daily",
    "sertraline 50 mg daily", "albuterol inhaler as needed", "apixaban 5 mg twice daily",
    "levothyroxine 75 mcg daily", "ferrous sulfate 325 mg daily", "ibuprofen 400 mg as needed",
    "omeprazole 20 mg daily", "atorvastatin 40 mg nightly", "nitrofurantoin 100 mg twice daily",
)
SYMPTOMS = (
    "chest tightness", "a persistent cough", "fatigue", "headaches", "low back pain",
    "shortness of breath", "dizziness", "burning on urination", "palpitations", "poor sleep",
)
PURPOSES = ("a car", "home repairs", "tuition", "medical bills", "a wedding", "debt consolidation")

_EPOCH = datetime.date(2015, 1, 1)
_BIRTH_EPOCH = datetime.date(1935, 1, 1)


def generator_version() -> str:
    """``faker==<installed version>;templates=<TEMPLATE_VERSION>;locale=en_US``."""
    import faker

    return f"faker=={faker.VERSION};templates={TEMPLATE_VERSION};locale={LOCALE}"


def private_records(num_records: int, *, kind: str = "mixed", seed: int = 0) -> list[str]:
    """``num_records`` fake sensitive records of ``kind`` (``clinical``/``bank``/``mixed``).

    Deterministic given ``seed`` and the ``faker`` version.
    """
    from faker import Faker

    _checks.int_at_least("num_records", num_records, 1)
    _checks.seed("seed", seed)
    if kind not in KINDS:
        raise ValueError(f"Expected kind={kind!r} to be one of {list(KINDS)}.")
    fake = Faker(LOCALE)
    fake.seed_instance(seed)
    makers = {"clinical": _CLINICAL, "bank": _BANK, "mixed": _CLINICAL + _BANK}[kind]
    return [fake.random.choice(makers)(fake) for _ in range(num_records)]


def _date(fake, start: datetime.date = _EPOCH, days: int = 3653) -> str:
    return (start + datetime.timedelta(days=fake.random.randrange(days))).isoformat()


def _amount(fake, high: int = 5000) -> str:
    return f"{fake.random.randrange(100, high * 100) / 100:,.2f}"


def _visit(fake) -> str:
    r = fake.random
    return (f"{_date(fake)}: {fake.name()} (DOB {_date(fake, _BIRTH_EPOCH, 25000)}) seen by "
            f"Dr. {fake.last_name()} for {r.choice(SYMPTOMS)}. Assessment: {r.choice(DIAGNOSES)}. "
            f"Plan: {r.choice(MEDICATIONS)}, follow up in {r.randint(1, 12)} weeks.")


def _discharge(fake) -> str:
    r = fake.random
    return (f"Discharge note for {fake.name()}, MRN {r.randrange(10**7):07d}. Admitted "
            f"{_date(fake)} with {r.choice(DIAGNOSES)}; discharged on {r.choice(MEDICATIONS)}. "
            f"Contact: {fake.phone_number()}.")


def _vitals(fake) -> str:
    r = fake.random
    return (f"{fake.name()}, age {r.randint(18, 90)}, reports {r.choice(SYMPTOMS)} since "
            f"{_date(fake)}. BP {r.randint(95, 180)}/{r.randint(55, 110)}, HR "
            f"{r.randint(48, 130)}. Dx: {r.choice(DIAGNOSES)}.")


def _transfer(fake) -> str:
    r = fake.random
    return (f"On {_date(fake)} {fake.name()} transferred ${_amount(fake)} from account ending "
            f"{r.randrange(10**4):04d} to {fake.company()}. Ref {r.randrange(16**8):08X}.")


def _card_alert(fake) -> str:
    r = fake.random
    return (f"Hi {fake.first_name()}, your card ending {r.randrange(10**4):04d} was charged "
            f"${_amount(fake, 900)} at {fake.company()} on {_date(fake)}. Not you? Call "
            f"{fake.phone_number()}.")


def _loan(fake) -> str:
    r = fake.random
    return (f"{fake.name()} of {fake.city()} applied for a ${_amount(fake, 40000)} loan for "
            f"{r.choice(PURPOSES)}; balance on {_date(fake)}: ${_amount(fake, 20000)}.")


_CLINICAL = (_visit, _discharge, _vitals)
_BANK = (_transfer, _card_alert, _loan)

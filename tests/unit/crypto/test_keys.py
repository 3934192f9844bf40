import datetime as dt
from dataclasses import replace

import pytest

from securefl.crypto import pki
from securefl.crypto.keys import KeyPair, sign_advertisement, verify_advertisement
from securefl.crypto.prg import derive_seed
from securefl.errors import CryptoError

# RFC 7748 §6.1
ALICE_SK = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PK = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_SK = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PK = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
SHARED = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
# RFC 7748 §5.2, first vector
SCALAR = bytes.fromhex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4")
U_IN = bytes.fromhex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")
U_OUT = bytes.fromhex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")

LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def test_rfc7748_public_keys():
    assert KeyPair.from_private_bytes(ALICE_SK).public == ALICE_PK
    assert KeyPair.from_private_bytes(BOB_SK).public == BOB_PK


def test_rfc7748_shared_secret_goes_through_labelled_hkdf():
    alice, bob = KeyPair.from_private_bytes(ALICE_SK), KeyPair.from_private_bytes(BOB_SK)
    want = derive_seed(SHARED, "pair-mask", b"ctx")
    assert alice.agree(BOB_PK, "pair-mask", b"ctx") == want
    assert bob.agree(ALICE_PK, "pair-mask", b"ctx") == want
    assert alice.agree(BOB_PK, "envelope", b"ctx") != want  # labels separate purposes


def test_rfc7748_scalar_multiplication_vector():
    assert KeyPair.from_private_bytes(SCALAR).agree(U_IN, "t") == derive_seed(U_OUT, "t")


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_public_keys_are_refused(point):
    with pytest.raises(CryptoError, match="low-order"):
        KeyPair().agree(bytes.fromhex(point), "pair-mask")


def test_wrong_length_public_key_is_refused():
    with pytest.raises(CryptoError, match="32 bytes"):
        KeyPair().agree(bytes(31), "pair-mask")


def test_private_key_never_printed():
    pair = KeyPair.from_private_bytes(ALICE_SK)
    assert ALICE_SK.hex() not in repr(pair) and "redacted" in repr(pair)
    assert pair == KeyPair.from_private_bytes(ALICE_SK) and pair != KeyPair()


def _advert(cred, **kw):
    return sign_advertisement(cred.key, cred.cert, round_id=3, base_version=7,
                              c_pk=KeyPair().public, s_pk=KeyPair().public, **kw)


def test_signed_advertisement_verifies(fed5):
    ca, creds = fed5
    adv = _advert(creds[0])
    assert adv.name == creds[0].name
    verify_advertisement(adv, ca.cert)


@pytest.mark.parametrize("field", ["c_pk", "s_pk", "round_id", "base_version"])
def test_any_change_breaks_the_signature(fed5, field):
    ca, creds = fed5
    adv = _advert(creds[0])
    value = getattr(adv, field)
    changed = KeyPair().public if isinstance(value, bytes) else value + 1
    with pytest.raises(CryptoError, match="bad signature"):
        verify_advertisement(replace(adv, **{field: changed}), ca.cert)


def test_keys_claimed_for_another_hospital_are_refused(fed5):
    ca, creds = fed5
    adv = replace(_advert(creds[0]), name=creds[1].name)
    with pytest.raises(CryptoError, match="signed by"):
        verify_advertisement(adv, ca.cert)


def test_certificate_of_another_ca_is_refused(fed5, other_ca):
    ca, _ = fed5
    with pytest.raises(CryptoError, match="not issued by this federation"):
        verify_advertisement(_advert(other_ca[1]), ca.cert)


def test_admin_certificate_cannot_advertise_round_keys(fed5):
    ca, _ = fed5
    admin = pki.issue(ca, pki.Role.ADMIN, "admin")
    with pytest.raises(CryptoError, match="not a hospital"):
        verify_advertisement(_advert(admin), ca.cert)


def test_expired_certificate_is_refused(fed5):
    ca, _ = fed5
    old = pki.issue(ca, pki.Role.HOSPITAL, "old-site", lifetime=dt.timedelta(days=1),
                    now=dt.datetime.now(dt.UTC) - dt.timedelta(days=10))
    with pytest.raises(CryptoError, match="not valid now"):
        verify_advertisement(_advert(old), ca.cert)


def test_garbage_certificate_is_refused(fed5):
    ca, creds = fed5
    with pytest.raises(CryptoError, match="certificate"):
        verify_advertisement(replace(_advert(creds[0]), cert_der=b"\x30\x03junk"), ca.cert)


@pytest.mark.parametrize("name", ["Hospital A", "../etc", "a/b", "-lead", "été"])
def test_a_ca_signed_certificate_with_a_name_we_never_issue_is_not_an_identity(name):
    """Names become file names and log fields: one the CA's own tools would refuse is not
    taken from a certificate either (say, one made by hand with the CA key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = pki.make_ca("fed")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME,
                                                        "hospital")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .sign(ca.key, hashes.SHA256()))
    with pytest.raises(CryptoError, match="never issues"):
        pki.identity_of(cert)
    good = pki.issue(ca, pki.Role.HOSPITAL, "hospital-a")
    assert pki.identity_of(good.cert) == (pki.Role.HOSPITAL, "hospital-a")

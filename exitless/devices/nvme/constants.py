"""NVMe 1.4 constants: controller registers, opcodes, status codes, identify offsets (spec names)."""

PAGE_SIZE = 4096                 # CC.MPS = 0 is the only memory page size we support (MPSMIN = MPSMAX = 0)

# -- controller registers (NVMe 1.4 §3.1) --------------------------------------------------
REG_CAP, REG_VS, REG_INTMS, REG_INTMC, REG_CC, REG_CSTS = 0x00, 0x08, 0x0C, 0x10, 0x14, 0x1C
REG_NSSR, REG_AQA, REG_ASQ, REG_ACQ, REG_CMBLOC, REG_CMBSZ = 0x20, 0x24, 0x28, 0x30, 0x38, 0x3C
DOORBELL_BASE = 0x1000           # SQ y tail at 0x1000 + 2y·(4 << DSTRD), CQ y head at +(4 << DSTRD); DSTRD = 0
DOORBELL_STRIDE = 4

VS_1_4 = 0x0001_0400

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_MPS_SHIFT, CC_AMS_SHIFT, CC_SHN_SHIFT = 4, 7, 11, 14
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20
CSTS_RDY, CSTS_CFS = 1 << 0, 1 << 1
CSTS_SHST_SHIFT = 2
SHST_NORMAL, SHST_OCCURRING, SHST_COMPLETE = 0, 1, 2

SQ_ENTRY_SIZE, CQ_ENTRY_SIZE = 64, 16
SQES_LOG2, CQES_LOG2 = 6, 4

# -- admin opcodes (§5) ------------------------------------------------------------------------
ADMIN_DELETE_SQ, ADMIN_CREATE_SQ, ADMIN_GET_LOG_PAGE = 0x00, 0x01, 0x02
ADMIN_DELETE_CQ, ADMIN_CREATE_CQ, ADMIN_IDENTIFY = 0x04, 0x05, 0x06
ADMIN_ABORT, ADMIN_SET_FEATURES, ADMIN_GET_FEATURES = 0x08, 0x09, 0x0A
ADMIN_ASYNC_EVENT_REQUEST = 0x0C
ADMIN_DOORBELL_BUFFER_CONFIG = 0x7C

# -- NVM command set opcodes (§6) ------------------------------------------------------------
NVM_FLUSH, NVM_WRITE, NVM_READ, NVM_WRITE_ZEROES, NVM_DATASET_MANAGEMENT = 0x00, 0x01, 0x02, 0x08, 0x09

# -- Identify CNS values (§5.15) -------------------------------------------------------------
CNS_NAMESPACE, CNS_CONTROLLER, CNS_ACTIVE_NS_LIST, CNS_NS_ID_DESCRIPTORS = 0x00, 0x01, 0x02, 0x03
CNS_CS_CONTROLLER = 0x06
NIDT_NGUID, NIDT_UUID = 0x02, 0x03

OACS_DBBUF = 1 << 8              # Identify Controller OACS bit 8: Doorbell Buffer Config supported
ONCS_DSM, ONCS_WRITE_ZEROES = 1 << 2, 1 << 3

# -- features (§5.21.1) ------------------------------------------------------------------------
FEAT_ARBITRATION, FEAT_POWER_MANAGEMENT, FEAT_TEMPERATURE_THRESHOLD = 0x01, 0x02, 0x04
FEAT_ERROR_RECOVERY, FEAT_VOLATILE_WRITE_CACHE, FEAT_NUMBER_OF_QUEUES = 0x05, 0x06, 0x07
FEAT_INTERRUPT_COALESCING, FEAT_INTERRUPT_VECTOR_CONFIG = 0x08, 0x09
FEAT_WRITE_ATOMICITY, FEAT_ASYNC_EVENT_CONFIG = 0x0A, 0x0B

# -- log pages (§5.14.1) -----------------------------------------------------------------------
LOG_ERROR_INFORMATION, LOG_SMART_HEALTH, LOG_FIRMWARE_SLOT = 0x01, 0x02, 0x03
ERROR_LOG_ENTRY_SIZE = 64

# -- asynchronous events (§5.2) -----------------------------------------------------------------
AER_TYPE_ERROR = 0x0
AER_INFO_INVALID_DOORBELL_REGISTER, AER_INFO_INVALID_DOORBELL_VALUE = 0x00, 0x01

# -- status: (status code type << 8) | status code (§4.6.1.2) --------------------------------
SCT_GENERIC, SCT_COMMAND_SPECIFIC, SCT_MEDIA = 0, 1, 2
SC_SUCCESS = 0x000
SC_INVALID_OPCODE = 0x001
SC_INVALID_FIELD = 0x002
SC_DATA_TRANSFER_ERROR = 0x004
SC_INTERNAL_ERROR = 0x006
SC_INVALID_NAMESPACE = 0x00B
SC_PRP_OFFSET_INVALID = 0x013
SC_NAMESPACE_WRITE_PROTECTED = 0x020
SC_LBA_OUT_OF_RANGE = 0x080
SC_COMPLETION_QUEUE_INVALID = 0x100
SC_INVALID_QUEUE_IDENTIFIER = 0x101
SC_INVALID_QUEUE_SIZE = 0x102
SC_ASYNC_EVENT_LIMIT_EXCEEDED = 0x105
SC_INVALID_INTERRUPT_VECTOR = 0x108
SC_INVALID_LOG_PAGE = 0x109
SC_INVALID_QUEUE_DELETION = 0x10C
SC_FEATURE_NOT_SAVEABLE = 0x10D
SC_WRITE_FAULT = 0x280
SC_UNRECOVERED_READ_ERROR = 0x281

# PCI identity: class 01h (mass storage), subclass 08h (non-volatile memory), interface 02h (NVMe)
PCI_CLASS_NVME = 0x010802
PCI_VENDOR_REDHAT, PCI_DEVICE_EXITLESS_NVME = 0x1B36, 0x0010   # the id QEMU's nvme uses: no Linux quirks

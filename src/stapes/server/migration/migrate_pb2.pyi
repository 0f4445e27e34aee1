from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MigrationFSType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RSYNC: _ClassVar[MigrationFSType]
    BTRFS: _ClassVar[MigrationFSType]
    ZFS: _ClassVar[MigrationFSType]
    RBD: _ClassVar[MigrationFSType]
    BLOCK_AND_RSYNC: _ClassVar[MigrationFSType]
    LINSTOR: _ClassVar[MigrationFSType]

class CRIUType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CRIU_RSYNC: _ClassVar[CRIUType]
    PHAUL: _ClassVar[CRIUType]
    NONE: _ClassVar[CRIUType]
    VM_QEMU: _ClassVar[CRIUType]
RSYNC: MigrationFSType
BTRFS: MigrationFSType
ZFS: MigrationFSType
RBD: MigrationFSType
BLOCK_AND_RSYNC: MigrationFSType
LINSTOR: MigrationFSType
CRIU_RSYNC: CRIUType
PHAUL: CRIUType
NONE: CRIUType
VM_QEMU: CRIUType

class IDMapType(_message.Message):
    __slots__ = ("isuid", "isgid", "hostid", "nsid", "maprange")
    ISUID_FIELD_NUMBER: _ClassVar[int]
    ISGID_FIELD_NUMBER: _ClassVar[int]
    HOSTID_FIELD_NUMBER: _ClassVar[int]
    NSID_FIELD_NUMBER: _ClassVar[int]
    MAPRANGE_FIELD_NUMBER: _ClassVar[int]
    isuid: bool
    isgid: bool
    hostid: int
    nsid: int
    maprange: int
    def __init__(self, isuid: _Optional[bool] = ..., isgid: _Optional[bool] = ..., hostid: _Optional[int] = ..., nsid: _Optional[int] = ..., maprange: _Optional[int] = ...) -> None: ...

class Config(_message.Message):
    __slots__ = ("key", "value")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: str
    def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("name", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: _containers.RepeatedCompositeFieldContainer[Config]
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Iterable[_Union[Config, _Mapping]]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("name", "localConfig", "profiles", "ephemeral", "localDevices", "architecture", "stateful", "creation_date", "last_used_date", "expiry_date", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCALCONFIG_FIELD_NUMBER: _ClassVar[int]
    PROFILES_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_FIELD_NUMBER: _ClassVar[int]
    LOCALDEVICES_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    STATEFUL_FIELD_NUMBER: _ClassVar[int]
    CREATION_DATE_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_DATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRY_DATE_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    localConfig: _containers.RepeatedCompositeFieldContainer[Config]
    profiles: _containers.RepeatedScalarFieldContainer[str]
    ephemeral: bool
    localDevices: _containers.RepeatedCompositeFieldContainer[Device]
    architecture: int
    stateful: bool
    creation_date: int
    last_used_date: int
    expiry_date: int
    description: str
    def __init__(self, name: _Optional[str] = ..., localConfig: _Optional[_Iterable[_Union[Config, _Mapping]]] = ..., profiles: _Optional[_Iterable[str]] = ..., ephemeral: _Optional[bool] = ..., localDevices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., architecture: _Optional[int] = ..., stateful: _Optional[bool] = ..., creation_date: _Optional[int] = ..., last_used_date: _Optional[int] = ..., expiry_date: _Optional[int] = ..., description: _Optional[str] = ...) -> None: ...

class rsyncFeatures(_message.Message):
    __slots__ = ("xattrs", "delete", "compress", "bidirectional", "stapesHardLinks")
    XATTRS_FIELD_NUMBER: _ClassVar[int]
    DELETE_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    BIDIRECTIONAL_FIELD_NUMBER: _ClassVar[int]
    STAPESHARDLINKS_FIELD_NUMBER: _ClassVar[int]
    xattrs: bool
    delete: bool
    compress: bool
    bidirectional: bool
    stapesHardLinks: bool
    def __init__(self, xattrs: _Optional[bool] = ..., delete: _Optional[bool] = ..., compress: _Optional[bool] = ..., bidirectional: _Optional[bool] = ..., stapesHardLinks: _Optional[bool] = ...) -> None: ...

class zfsFeatures(_message.Message):
    __slots__ = ("compress", "migration_header", "header_zvols")
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_HEADER_FIELD_NUMBER: _ClassVar[int]
    HEADER_ZVOLS_FIELD_NUMBER: _ClassVar[int]
    compress: bool
    migration_header: bool
    header_zvols: bool
    def __init__(self, compress: _Optional[bool] = ..., migration_header: _Optional[bool] = ..., header_zvols: _Optional[bool] = ...) -> None: ...

class btrfsFeatures(_message.Message):
    __slots__ = ("migration_header", "header_subvolumes", "header_subvolume_uuids")
    MIGRATION_HEADER_FIELD_NUMBER: _ClassVar[int]
    HEADER_SUBVOLUMES_FIELD_NUMBER: _ClassVar[int]
    HEADER_SUBVOLUME_UUIDS_FIELD_NUMBER: _ClassVar[int]
    migration_header: bool
    header_subvolumes: bool
    header_subvolume_uuids: bool
    def __init__(self, migration_header: _Optional[bool] = ..., header_subvolumes: _Optional[bool] = ..., header_subvolume_uuids: _Optional[bool] = ...) -> None: ...

class MigrationHeader(_message.Message):
    __slots__ = ("fs", "criu", "idmap", "snapshotNames", "snapshots", "predump", "rsyncFeatures", "refresh", "zfsFeatures", "volumeSize", "btrfsFeatures", "indexHeaderVersion", "stapesTransports", "stapesTotalBytes", "stapesLazy", "stapesStreamedState", "stapesHandover")
    FS_FIELD_NUMBER: _ClassVar[int]
    CRIU_FIELD_NUMBER: _ClassVar[int]
    IDMAP_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTNAMES_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOTS_FIELD_NUMBER: _ClassVar[int]
    PREDUMP_FIELD_NUMBER: _ClassVar[int]
    RSYNCFEATURES_FIELD_NUMBER: _ClassVar[int]
    REFRESH_FIELD_NUMBER: _ClassVar[int]
    ZFSFEATURES_FIELD_NUMBER: _ClassVar[int]
    VOLUMESIZE_FIELD_NUMBER: _ClassVar[int]
    BTRFSFEATURES_FIELD_NUMBER: _ClassVar[int]
    INDEXHEADERVERSION_FIELD_NUMBER: _ClassVar[int]
    STAPESTRANSPORTS_FIELD_NUMBER: _ClassVar[int]
    STAPESTOTALBYTES_FIELD_NUMBER: _ClassVar[int]
    STAPESLAZY_FIELD_NUMBER: _ClassVar[int]
    STAPESSTREAMEDSTATE_FIELD_NUMBER: _ClassVar[int]
    STAPESHANDOVER_FIELD_NUMBER: _ClassVar[int]
    fs: MigrationFSType
    criu: CRIUType
    idmap: _containers.RepeatedCompositeFieldContainer[IDMapType]
    snapshotNames: _containers.RepeatedScalarFieldContainer[str]
    snapshots: _containers.RepeatedCompositeFieldContainer[Snapshot]
    predump: bool
    rsyncFeatures: rsyncFeatures
    refresh: bool
    zfsFeatures: zfsFeatures
    volumeSize: int
    btrfsFeatures: btrfsFeatures
    indexHeaderVersion: int
    stapesTransports: _containers.RepeatedScalarFieldContainer[str]
    stapesTotalBytes: int
    stapesLazy: bool
    stapesStreamedState: bool
    stapesHandover: bool
    def __init__(self, fs: _Optional[_Union[MigrationFSType, str]] = ..., criu: _Optional[_Union[CRIUType, str]] = ..., idmap: _Optional[_Iterable[_Union[IDMapType, _Mapping]]] = ..., snapshotNames: _Optional[_Iterable[str]] = ..., snapshots: _Optional[_Iterable[_Union[Snapshot, _Mapping]]] = ..., predump: _Optional[bool] = ..., rsyncFeatures: _Optional[_Union[rsyncFeatures, _Mapping]] = ..., refresh: _Optional[bool] = ..., zfsFeatures: _Optional[_Union[zfsFeatures, _Mapping]] = ..., volumeSize: _Optional[int] = ..., btrfsFeatures: _Optional[_Union[btrfsFeatures, _Mapping]] = ..., indexHeaderVersion: _Optional[int] = ..., stapesTransports: _Optional[_Iterable[str]] = ..., stapesTotalBytes: _Optional[int] = ..., stapesLazy: _Optional[bool] = ..., stapesStreamedState: _Optional[bool] = ..., stapesHandover: _Optional[bool] = ...) -> None: ...

class MigrationControl(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class MigrationSync(_message.Message):
    __slots__ = ("finalPreDump",)
    FINALPREDUMP_FIELD_NUMBER: _ClassVar[int]
    finalPreDump: bool
    def __init__(self, finalPreDump: _Optional[bool] = ...) -> None: ...
